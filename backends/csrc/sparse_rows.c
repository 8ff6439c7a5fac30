/* Native single-token sparse kernels for the cpu backend (edgesparse.backends.native).
 *
 * Why native: in torch, a sparse FFN step is several ops (scores, a gather that copies the
 * selected rows, a GEMM on the copy, an embedding_bag), each with its own pass over memory
 * and its own dispatch cost.  Here one pass over the neurons does score -> gate -> ReLU ->
 * up -> down for each neuron while its rows stream in, so every weight byte that is needed is
 * read once and nothing is copied (measured in docs/performance.md).
 *
 * Portable C: the inner loops are `omp simd` reductions that gcc/clang vectorise for the
 * target (AVX-512/AVX2 on x86, NEON on aarch64/Jetson).  Weights are bf16 (stored as
 * uint16) or fp32; activations and accumulation are fp32.  Threads: OpenMP, sharing the
 * libgomp runtime torch has already loaded (same soname), so there is one thread pool.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <omp.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define DEFINE_ROW_OPS(SUFFIX, WT, LOAD)                                                   \
    static inline float dot_##SUFFIX(const WT *restrict w, const float *restrict x, int n) { \
        float acc = 0.f;                                                                  \
        _Pragma("omp simd reduction(+:acc)")                                              \
        for (int i = 0; i < n; i++) acc += LOAD(w[i]) * x[i];                            \
        return acc;                                                                       \
    }                                                                                     \
    static inline void axpy_##SUFFIX(float a, const WT *restrict w, float *restrict y, int n) { \
        _Pragma("omp simd")                                                               \
        for (int i = 0; i < n; i++) y[i] += a * LOAD(w[i]);                              \
    }

#define LOAD_F32(v) (v)
DEFINE_ROW_OPS(bf16_portable, uint16_t, bf16_to_f32)
DEFINE_ROW_OPS(f32, float, LOAD_F32)

#if defined(__AVX512F__)
#include <immintrin.h>
/* AVX-512: four independent accumulators hide the FMA latency (one chain is latency-bound
 * at about half the memory bandwidth of this class of CPU). */
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* Dot and axpy over one row, prefetching the row that will be read next (`next`, same length) at the
 * same offset: selected rows are scattered, so the hardware prefetcher would restart on
 * every row; one row ahead (8 KB at d = 4096) covers the memory latency. */
static inline float dot_pf_bf16(const uint16_t *restrict w, const float *restrict x, int n, const uint16_t *next) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        if (next) { _mm_prefetch((const char *)(next + i), _MM_HINT_T0); _mm_prefetch((const char *)(next + i + 32), _MM_HINT_T0); }
        a0 = _mm512_fmadd_ps(load16_bf16(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(load16_bf16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(load16_bf16(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(load16_bf16(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    float acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    return acc + (i < n ? dot_bf16_portable(w + i, x + i, n - i) : 0.f);
}
static inline float dot_bf16(const uint16_t *restrict w, const float *restrict x, int n) {
    return dot_pf_bf16(w, x, n, NULL);
}
static inline void axpy_pf_bf16(float a, const uint16_t *restrict w, float *restrict y, int n, const uint16_t *next) {
    __m512 va = _mm512_set1_ps(a);
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        if (next) _mm_prefetch((const char *)(next + i), _MM_HINT_T0);
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load16_bf16(w + i), _mm512_loadu_ps(y + i)));
        _mm512_storeu_ps(y + i + 16, _mm512_fmadd_ps(va, load16_bf16(w + i + 16), _mm512_loadu_ps(y + i + 16)));
    }
    if (i < n) axpy_bf16_portable(a, w + i, y + i, n - i);
}
#else
#define dot_bf16 dot_bf16_portable
#define dot_pf_bf16(w, x, n, next) ((void)(next), dot_bf16_portable(w, x, n))
#define axpy_pf_bf16(a, w, y, n, next) ((void)(next), axpy_bf16_portable(a, w, y, n))
#endif
#define dot_pf_f32(w, x, n, next) ((void)(next), dot_f32(w, x, n))
#define axpy_pf_f32(a, w, y, n, next) ((void)(next), axpy_f32(a, w, y, n))

/* Add each thread's partial sum into out (one thread at a time; d floats each). */
static void reduce_into(float *restrict out, const float *restrict part, int d) {
    #pragma omp critical
    for (int i = 0; i < d; i++) out[i] += part[i];
}

/* ReGLU FFN of one token over the neurons that matter.
 *   pred_a_t [r, d], pred_b_t [F, r], pred_bias [F]: low-rank predictor (NULL: every
 *   neuron is a candidate, i.e. exact mode with a dense gate);
 *   gate, up, down_t [F, d].  out [d] is overwritten.  counts[0] = candidates (gate rows
 *   read), counts[1] = active neurons (up/down rows read).
 * Each thread owns a contiguous range of neurons: it scores them into a candidate list,
 * then walks the list reading gate, (up, down) rows in order, prefetching the next row of
 * that sequence (up after gate, down after up, the next candidate's gate after down). */
#define DEFINE_FFN(S, WT)                                                                         \
    void es_reglu_ffn_##S(const float *x, const WT *pred_a_t, const WT *pred_b_t,                   \
                          const float *pred_bias, const WT *gate, const WT *up,                   \
                          const WT *down_t, int d, int r, int f, int n_threads,                    \
                          float *t_buf, float *out, int64_t *counts) {                            \
        int64_t n_cand = 0, n_active = 0;                                                          \
        memset(out, 0, sizeof(float) * d);                                                        \
        _Pragma("omp parallel num_threads(n_threads) reduction(+:n_cand, n_active)")              \
        {                                                                                         \
            if (pred_a_t) {                                                                       \
                _Pragma("omp for schedule(static)")                                               \
                for (int j = 0; j < r; j++) t_buf[j] = dot_##S(pred_a_t + (int64_t)j * d, x, d);  \
            }                                                                                     \
            int nt = omp_get_num_threads(), id = omp_get_thread_num();                           \
            int lo = (int)((int64_t)f * id / nt), hi = (int)((int64_t)f * (id + 1) / nt);         \
            float *part = (float *)calloc((size_t)d, sizeof(float));                              \
            int *cand = (int *)malloc(sizeof(int) * (size_t)(hi - lo + 1));                       \
            int nc = 0;                                                                           \
            for (int i = lo; i < hi; i++)                                                         \
                if (!pred_a_t || dot_##S(pred_b_t + (int64_t)i * r, t_buf, r) + pred_bias[i] > 0.f) \
                    cand[nc++] = i;                                                               \
            for (int k = 0; k < nc; k++) {                                                        \
                int64_t row = (int64_t)cand[k] * d;                                               \
                const WT *next_gate = k + 1 < nc ? gate + (int64_t)cand[k + 1] * d : NULL;        \
                float g = dot_pf_##S(gate + row, x, d, up + row);                                 \
                if (g <= 0.f) continue;                                                           \
                n_active++;                                                                       \
                float h = g * dot_pf_##S(up + row, x, d, down_t + row);                           \
                axpy_pf_##S(h, down_t + row, part, d, next_gate);                                 \
            }                                                                                     \
            n_cand += nc;                                                                         \
            reduce_into(out, part, d);                                                            \
            free(cand);                                                                           \
            free(part);                                                                           \
        }                                                                                         \
        counts[0] = n_cand;                                                                       \
        counts[1] = n_active;                                                                     \
    }

DEFINE_FFN(bf16, uint16_t)
DEFINE_FFN(f32, float)

/* out[d_out] = sum_j coef[j] * w[idx[j]] : the Top-K linear and any down projection over a
 * given row set.  Threads split the rows (each whole row streams through one core, with the
 * next row prefetched) into private sums that are added at the end; splitting the columns
 * instead made each core read half-rows and ran ~35% slower. */
#define DEFINE_ROWS(S, WT)                                                                        \
    void es_weighted_rows_##S(const WT *w, const int64_t *idx, const float *coef, int n,            \
                              int d_out, int n_threads, float *out) {                            \
        memset(out, 0, sizeof(float) * d_out);                                                    \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            int nt = omp_get_num_threads(), id = omp_get_thread_num();                           \
            int lo = (int)((int64_t)n * id / nt), hi = (int)((int64_t)n * (id + 1) / nt);         \
            float *part = (float *)calloc((size_t)d_out, sizeof(float));                          \
            for (int j = lo; j < hi; j++) {                                                       \
                const WT *next = j + 1 < hi ? w + idx[j + 1] * (int64_t)d_out : NULL;             \
                axpy_pf_##S(coef[j], w + idx[j] * (int64_t)d_out, part, d_out, next);              \
            }                                                                                     \
            if (hi > lo) reduce_into(out, part, d_out);                                           \
            free(part);                                                                           \
        }                                                                                         \
    }

DEFINE_ROWS(bf16, uint16_t)
DEFINE_ROWS(f32, float)

/* out[n] = w[n, d] @ x[d] (+ bias): the dense single-token linear (attention projections,
 * lm_head, the dense FFN's gate/up) as one streaming pass with fp32 accumulation. */
#define DEFINE_GEMV(S, WT)                                                                        \
    void es_gemv_##S(const WT *w, const float *x, const float *bias, int n, int d, int n_threads,    \
                     float *out) {                                                                \
        _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                       \
        for (int i = 0; i < n; i++)  /* sequential rows: the hardware prefetcher suffices */   \
            out[i] = dot_##S(w + (int64_t)i * d, x, d) + (bias ? bias[i] : 0.f);                  \
    }

DEFINE_GEMV(bf16, uint16_t)
DEFINE_GEMV(f32, float)

/* The k-th largest of a[0..n) (0 < k <= n), reordering a: quickselect. */
static float kth_largest(float *a, int n, int k) {
    int lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return a[want];
}

/* Top-K linear of one token: keep the k largest |x_j|, ties at the k-th magnitude going to
 * the lower j (bf16 activations tie often; `topk_indices` in interface.py applies the same
 * rule on the torch paths, so every path keeps the same set), then out = sum over kept j of
 * x_j * w_t[j].  The row list comes out ascending, so the kept rows stream nearly in order. */
#define DEFINE_TOPK(S, WT)                                                                        \
    void es_topk_linear_##S(const WT *w_t, const float *x, int d_in, int d_out, int k,              \
                            int n_threads, float *out) {                                         \
        float *mag = (float *)malloc(sizeof(float) * (size_t)d_in);                               \
        int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)k);                            \
        float *coef = (float *)malloc(sizeof(float) * (size_t)k);                                 \
        for (int j = 0; j < d_in; j++) mag[j] = x[j] < 0 ? -x[j] : x[j];                          \
        float t = kth_largest(mag, d_in, k);                                                      \
        int above = 0;                                                                            \
        for (int j = 0; j < d_in; j++) above += (x[j] < 0 ? -x[j] : x[j]) > t;                    \
        int ties = k - above, n = 0;                                                              \
        for (int j = 0; j < d_in && n < k; j++) {                                                 \
            float m = x[j] < 0 ? -x[j] : x[j];                                                    \
            if (m > t || (m == t && ties-- > 0)) { idx[n] = j; coef[n] = x[j]; n++; }             \
        }                                                                                         \
        es_weighted_rows_##S(w_t, idx, coef, n, d_out, n_threads, out);                           \
        free(mag); free(idx); free(coef);                                                         \
    }

DEFINE_TOPK(bf16, uint16_t)
DEFINE_TOPK(f32, float)
