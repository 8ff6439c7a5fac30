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
 * uint16) or fp32.  Activations come in and results go out in the weights' dtype (no
 * conversion ops around each call); inside, everything is fp32, and bf16 results are rounded
 * to nearest-even like torch's.  Threads: OpenMP, sharing the libgomp runtime torch has
 * already loaded (same soname), so there is one thread pool.
 */
#include "common.h"

/* Software prefetch into L2 (gcc/clang builtin: prefetcht1 on x86, prfm on arm).  Rows are
 * read in an order the hardware prefetcher cannot guess (gathered rows), or it ramps up too
 * slowly at each row start, so every loop below passes the row it will read about PF_AHEAD
 * bytes later as `pf`, and the dot/axpy over the current row prefetches that row at the same
 * offsets as it goes: one prefetch per 64 bytes read, spread over the loop.  On the 2-core dev
 * VM this took gathered 4-8 KB bf16 rows from ~20 to ~28 GB/s; prefetching a whole row in
 * one burst was slower (~21-23 GB/s), presumably because the burst queues up behind the
 * core's few outstanding-miss slots (docs/performance.md). */
#define PF_AHEAD 16384
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 2)
static inline void prefetch_row(const void *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) PREFETCH((const char *)p + o);
}
static inline int64_t rows_ahead(int64_t row_bytes) {
    return (PF_AHEAD + row_bytes - 1) / row_bytes;
}

/* Portable row ops (any target; also the tails of the AVX-512 ones): the prefetch row goes
 * out in one burst, then the vectorised loop runs. */
#define DEFINE_ROW_OPS(SUFFIX, WT, LOAD)                                                   \
    static inline float dot_##SUFFIX(const WT *restrict w, const float *restrict x, int n,  \
                                     const WT *pf) {                                     \
        if (pf) prefetch_row(pf, (int64_t)n * (int64_t)sizeof(WT));                      \
        float acc = 0.f;                                                                  \
        _Pragma("omp simd reduction(+:acc)")                                              \
        for (int i = 0; i < n; i++) acc += LOAD(w[i]) * x[i];                            \
        return acc;                                                                       \
    }                                                                                     \
    static inline void axpy_##SUFFIX(float a, const WT *restrict w, float *restrict y, int n, \
                                     const WT *pf) {                                     \
        if (pf) prefetch_row(pf, (int64_t)n * (int64_t)sizeof(WT));                      \
        _Pragma("omp simd")                                                               \
        for (int i = 0; i < n; i++) y[i] += a * LOAD(w[i]);                              \
    }

DEFINE_ROW_OPS(bf16_portable, uint16_t, bf16_to_f32)
DEFINE_ROW_OPS(f32, float, LOAD_F32)

#if defined(__AVX512F__)
#include <immintrin.h>
/* bf16 on AVX-512 uses "pair-split" vector order: in each block of 32 elements the 16 even
 * ones come first, then the 16 odd ones.  A 64-byte load of 32 bf16 weights then becomes two
 * fp32 vectors with one shift (even) and one mask (odd) and meets x in the same order, which
 * is ~30% fewer instructions per byte than widening conversions; fewer instructions keep
 * more loads in flight, and that is what bounds a single-token GEMV here.  Activations are
 * split on entry and outputs merged on exit (d floats, negligible). */
#define SPLIT_bf16 1
static inline float dot_bf16(const uint16_t *restrict w, const float *restrict xs, int n, const uint16_t *pf) {
    const __m512i odd = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 64 <= n; i += 64) {   /* four accumulators hide the FMA latency */
        if (pf) { PREFETCH(pf + i); PREFETCH(pf + i + 32); }
        __m512i v0 = _mm512_loadu_si512(w + i), v1 = _mm512_loadu_si512(w + i + 32);
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)), _mm512_loadu_ps(xs + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v0, odd)), _mm512_loadu_ps(xs + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)), _mm512_loadu_ps(xs + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v1, odd)), _mm512_loadu_ps(xs + i + 48), a3);
    }
    for (; i + 32 <= n; i += 32) {
        if (pf) PREFETCH(pf + i);
        __m512i v = _mm512_loadu_si512(w + i);
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_loadu_ps(xs + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, odd)), _mm512_loadu_ps(xs + i + 16), a1);
    }
    float acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    /* tail: natural order */
    return acc + (i < n ? dot_bf16_portable(w + i, xs + i, n - i, pf ? pf + i : NULL) : 0.f);
}
static inline void axpy_bf16(float a, const uint16_t *restrict w, float *restrict ys, int n, const uint16_t *pf) {
    const __m512i odd = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 va = _mm512_set1_ps(a);
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        if (pf) PREFETCH(pf + i);
        __m512i v = _mm512_loadu_si512(w + i);
        _mm512_storeu_ps(ys + i, _mm512_fmadd_ps(va, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_loadu_ps(ys + i)));
        _mm512_storeu_ps(ys + i + 16, _mm512_fmadd_ps(va, _mm512_castsi512_ps(_mm512_and_si512(v, odd)), _mm512_loadu_ps(ys + i + 16)));
    }
    if (i < n) axpy_bf16_portable(a, w + i, ys + i, n - i, pf ? pf + i : NULL);
}
#else
#define SPLIT_bf16 0
#define dot_bf16 dot_bf16_portable
#define axpy_bf16 axpy_bf16_portable
#endif
#define SPLIT_f32 0

/* int8 rows (the predictor's factors when calibration left them on a per-row int8 grid, see
 * predictors/int8.py) against fp32 x in natural order: half the bytes of bf16. */
static inline float dot_i8(const int8_t *restrict w, const float *restrict x, int n, const int8_t *pf) {
    int i = 0;
    float acc = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 64 <= n; i += 64) {
        if (pf) PREFETCH(pf + i);
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i)))), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i + 16)))), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i + 32)))), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i + 48)))), _mm512_loadu_ps(x + i + 48), a3);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    if (pf) prefetch_row(pf, n);
#endif
    _Pragma("omp simd reduction(+:acc)")
    for (int j = i; j < n; j++) acc += (float)w[j] * x[j];
    return acc;
}

/* out[i - lo] = scale[i] * (w[i] . x) for the consecutive int8 rows lo..hi-1 of w [*, d]. */
#if defined(__AVX512F__)
/* Two short rows at once (the predictor's B has rows of r = 256-512 bytes): shared x loads and
 * two independent chains; d % 64 == 0 only. */
static inline void dot2_i8(const int8_t *w0, const int8_t *w1, const float *x, int n, const int8_t *pf, float *o) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int i = 0; i < n; i += 32) {
        if (pf) PREFETCH(pf + 2 * i);
        __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w0 + i)))), x0, a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w0 + i + 16)))), x1, a1);
        b0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w1 + i)))), x0, b0);
        b1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w1 + i + 16)))), x1, b1);
    }
    o[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    o[1] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
}
#endif

static void seq_dots_i8(const int8_t *w, int64_t lo, int64_t hi, int d, const float *x, const float *scale, float *out) {
    int64_t lead = rows_ahead(d), i = lo;
#if defined(__AVX512F__)
    if (d % 64 == 0 && d <= 1024)
        for (; i + 1 < hi; i += 2) {
            float o[2];
            dot2_i8(w + i * d, w + (i + 1) * d, x, d, i + lead + 1 < hi ? w + (i + lead) * d : NULL, o);
            out[i - lo] = scale[i] * o[0];
            out[i + 1 - lo] = scale[i + 1] * o[1];
        }
#endif
    for (; i < hi; i++)
        out[i - lo] = scale[i] * dot_i8(w + i * d, x, d, i + lead < hi ? w + (i + lead) * d : NULL);
}

/* Activations x (natural order, weight dtype) -> xs (fp32, in the order the dot/axpy of
 * that weight type expect); fp32 results (kernel order) -> out (natural order, weight
 * dtype), adding an optional bias first. */
#define DEFINE_LOAD_SPLIT(NAME, XT, LOAD, SPLIT)                                                 \
    static void NAME(const XT *x, float *xs, int n) {                                             \
        int nb = (SPLIT) ? n / 32 * 32 : 0;                                                       \
        for (int b = 0; b < nb; b += 32)                                                          \
            for (int i = 0; i < 16; i++) { xs[b + i] = LOAD(x[b + 2 * i]); xs[b + 16 + i] = LOAD(x[b + 2 * i + 1]); } \
        for (int i = nb; i < n; i++) xs[i] = LOAD(x[i]);                                          \
    }
DEFINE_LOAD_SPLIT(load_split_bf16, uint16_t, bf16_to_f32, SPLIT_bf16)
DEFINE_LOAD_SPLIT(load_split_f32, float, LOAD_F32, SPLIT_f32)
DEFINE_LOAD_SPLIT(split_hidden_bf16, float, LOAD_F32, SPLIT_bf16)   /* fp32 predictor hidden */
#define split_hidden_f32 load_split_f32

#define DEFINE_STORE_MERGED(S, WT, LOAD, STORE)                                                   \
    static void store_merged_##S(const float *acc, const WT *bias, WT *out, int n) {              \
        int nb = SPLIT_##S ? n / 32 * 32 : 0;                                                     \
        for (int b = 0; b < nb; b += 32)                                                          \
            for (int i = 0; i < 16; i++) {                                                        \
                out[b + 2 * i] = STORE(acc[b + i] + (bias ? LOAD(bias[b + 2 * i]) : 0.f));        \
                out[b + 2 * i + 1] = STORE(acc[b + 16 + i] + (bias ? LOAD(bias[b + 2 * i + 1]) : 0.f)); \
            }                                                                                     \
        for (int i = nb; i < n; i++) out[i] = STORE(acc[i] + (bias ? LOAD(bias[i]) : 0.f));       \
    }
DEFINE_STORE_MERGED(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_STORE_MERGED(f32, float, LOAD_F32, STORE_F32)

/* Add each thread's partial sum into out (one thread at a time; d floats each). */
static void reduce_into(float *restrict out, const float *restrict part, int d) {
    #pragma omp critical
    for (int i = 0; i < d; i++) out[i] += part[i];
}

/* out[i - lo] = w[i] . xs for the consecutive rows lo..hi-1 of w [*, d]. */
#define DEFINE_SEQ_DOTS(S, WT)                                                                    \
    static void seq_dots_##S(const WT *w, int64_t lo, int64_t hi, int d, const float *xs, float *out) { \
        int64_t row = (int64_t)d * (int64_t)sizeof(WT), lead = rows_ahead(row);                   \
        for (int64_t i = lo; i < hi; i++)                                                         \
            out[i - lo] = dot_##S(w + i * d, xs, d, i + lead < hi ? w + (i + lead) * d : NULL);   \
    }
DEFINE_SEQ_DOTS(bf16, uint16_t)
DEFINE_SEQ_DOTS(f32, float)

/* This thread's share [lo, hi) of n items. */
#define THREAD_RANGE(n, lo, hi)                                                                   \
    int64_t lo = (int64_t)(n) * omp_get_thread_num() / omp_get_num_threads(),                    \
            hi = (int64_t)(n) * (omp_get_thread_num() + 1) / omp_get_num_threads()

/* ReGLU FFN of one token over the neurons that matter.
 *   pred_a_t [r, d], pred_b_t [F, r], pred_bias [F]: low-rank predictor; qa [r, d] / qb [F, r]
 *   with per-row scales sa, sb: int8 rows used instead of pred_a_t / pred_b_t where given
 *   (each independently: a LaRoSA-rotated A leaves its grid, B keeps it);
 *   all NULL: every neuron is a candidate, i.e. exact mode with a dense gate;
 *   gate, up, down_t [F, d].  out [d] is overwritten.  counts[0] = candidates (gate rows
 *   read), counts[1] = active neurons (up/down rows read).
 * Each thread owns a contiguous range of neurons and makes two passes over it: the gate rows
 * of its candidates (ascending, so in exact mode a plain stream), then the up and down rows
 * of the neurons whose gate > thr (ReLU: thr = 0; FATReLU: its threshold, >= 0).  Two passes let every prefetch be for a row that will
 * be read: a single interleaved pass would prefetch up/down rows of false positives. */
#define DEFINE_FFN(S, WT)                                                                         \
    void es_reglu_ffn_##S(const WT *x, const WT *pred_a_t, const WT *pred_b_t,                      \
                          const int8_t *qa, const float *sa, const int8_t *qb, const float *sb,   \
                          const WT *pred_bias, const WT *gate, const WT *up, const WT *down_t,    \
                          int d, int r, int f, int n_threads, float thr, WT *out, int64_t *counts) { \
        const int pred = pred_a_t || qa || qb;                                                    \
        int64_t n_cand = 0, n_active = 0, row = (int64_t)d * (int64_t)sizeof(WT);                \
        float *xs = (float *)malloc(sizeof(float) * (size_t)d);                                   \
        float *acc = (float *)calloc((size_t)d, sizeof(float));                                   \
        float *t_buf = (float *)malloc(sizeof(float) * (size_t)(r + 1));                          \
        float *xn = qa ? (float *)malloc(sizeof(float) * (size_t)d) : NULL;   /* natural order */ \
        load_split_##S(x, xs, d);                                                                 \
        if (qa) for (int i = 0; i < d; i++) xn[i] = LOAD_##S(x[i]);                               \
        _Pragma("omp parallel num_threads(n_threads) reduction(+:n_cand, n_active)")              \
        {                                                                                         \
            if (pred) {                                                                           \
                THREAD_RANGE(r, r_lo, r_hi);                                                      \
                if (qa) seq_dots_i8(qa, r_lo, r_hi, d, xn, sa, t_buf + r_lo);                     \
                else seq_dots_##S(pred_a_t, r_lo, r_hi, d, xs, t_buf + r_lo);                     \
            }                                                                                     \
            _Pragma("omp barrier")                                                                \
            THREAD_RANGE(f, lo, hi);                                                              \
            float *part = (float *)calloc((size_t)d, sizeof(float));                              \
            float *ts = (float *)malloc(sizeof(float) * (size_t)(r + 1));                         \
            float *val = (float *)malloc(sizeof(float) * (size_t)(hi - lo + 1));                  \
            int *ids = (int *)malloc(sizeof(int) * (size_t)(hi - lo + 1));                        \
            int nc = 0, na = 0;                                                                   \
            if (qb) seq_dots_i8(qb, lo, hi, r, t_buf, sb, val);                                   \
            else if (pred) {                                                                      \
                split_hidden_##S(t_buf, ts, r);                                                   \
                seq_dots_##S(pred_b_t, lo, hi, r, ts, val);                                       \
            }                                                                                     \
            for (int64_t i = lo; i < hi; i++)                                                     \
                if (!pred || val[i - lo] + LOAD_##S(pred_bias[i]) > 0.f) ids[nc++] = (int)i;      \
            /* pass 1: gate rows of the candidates -> ids/val become the active neurons */      \
            int64_t lead = rows_ahead(row);                                                       \
            for (int k = 0; k < nc; k++) {                                                        \
                const WT *pf = k + lead < nc ? gate + (int64_t)ids[k + lead] * d : NULL;          \
                float g = dot_##S(gate + (int64_t)ids[k] * d, xs, d, pf);                         \
                if (g > thr) { ids[na] = ids[k]; val[na++] = g; }   /* FATReLU: thr; ReLU: 0 */  \
            }                                                                                     \
            /* pass 2: up then down row of each active neuron; the prefetch runs `lead` rows  \
             * ahead in that sequence (up0 down0 up1 down1 ...) */                               \
            const WT *mats[2] = {up, down_t};                                                     \
            for (int k = 0; k < na; k++) {                                                        \
                const int64_t off = (int64_t)ids[k] * d, s = 2 * (int64_t)k + lead;               \
                const WT *pf_u = s < 2 * na ? mats[s & 1] + (int64_t)ids[s >> 1] * d : NULL;      \
                const WT *pf_d = s + 1 < 2 * na ? mats[(s + 1) & 1] + (int64_t)ids[(s + 1) >> 1] * d : NULL; \
                axpy_##S(val[k] * dot_##S(up + off, xs, d, pf_u), down_t + off, part, d, pf_d);   \
            }                                                                                     \
            n_cand += nc;                                                                         \
            n_active += na;                                                                       \
            reduce_into(acc, part, d);                                                            \
            free(ids); free(val); free(ts); free(part);                                           \
        }                                                                                         \
        store_merged_##S(acc, NULL, out, d);                                                      \
        free(xn); free(t_buf); free(acc); free(xs);                                               \
        counts[0] = n_cand;                                                                       \
        counts[1] = n_active;                                                                     \
    }

DEFINE_FFN(bf16, uint16_t)
DEFINE_FFN(f32, float)

/* acc[d_out] (kernel order, zeroed) += sum_j coef[j] * w[idx[j]] (idx NULL: row j): the
 * Top-K linear and any down projection over a given row set.  Threads split the rows (each
 * whole row streams through one core) into private sums that are added at the end; splitting
 * the columns instead made each core read half-rows and ran ~35% slower. */
#define DEFINE_ROWS(S, WT)                                                                        \
    static void rows_into_##S(const WT *w, const int64_t *idx, const float *coef, int n,          \
                              int d_out, int n_threads, float *acc) {                            \
        int64_t row = (int64_t)d_out * (int64_t)sizeof(WT), lead = rows_ahead(row);               \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            THREAD_RANGE(n, lo, hi);                                                              \
            float *part = (float *)calloc((size_t)d_out, sizeof(float));                          \
            for (int64_t j = lo; j < hi; j++) {                                                   \
                const WT *pf = j + lead < hi ? w + (idx ? idx[j + lead] : j + lead) * (int64_t)d_out : NULL; \
                axpy_##S(coef[j], w + (idx ? idx[j] : j) * (int64_t)d_out, part, d_out, pf);      \
            }                                                                                     \
            if (hi > lo) reduce_into(acc, part, d_out);                                           \
            free(part);                                                                           \
        }                                                                                         \
    }                                                                                             \
    void es_weighted_rows_##S(const WT *w, const int64_t *idx, const WT *coef, int n, int d_out,    \
                              int n_threads, WT *out) {                                          \
        float *cf = (float *)malloc(sizeof(float) * (size_t)(n + 1));                             \
        float *acc = (float *)calloc((size_t)d_out, sizeof(float));                               \
        for (int j = 0; j < n; j++) cf[j] = LOAD_##S(coef[j]);                                    \
        rows_into_##S(w, idx, cf, n, d_out, n_threads, acc);                                      \
        store_merged_##S(acc, NULL, out, d_out);                                                  \
        free(acc); free(cf);                                                                      \
    }

DEFINE_ROWS(bf16, uint16_t)
DEFINE_ROWS(f32, float)

/* out[n] = w[n, d] @ x[d] (+ bias): the dense single-token linear (attention projections,
 * lm_head, the dense FFN's gate/up) as one streaming pass with fp32 accumulation. */
#define DEFINE_GEMV(S, WT)                                                                        \
    void es_gemv_##S(const WT *w, const WT *x, const WT *bias, int n, int d, int n_threads, WT *out) { \
        float *xs = (float *)malloc(sizeof(float) * (size_t)d);                                   \
        float *acc = (float *)malloc(sizeof(float) * (size_t)n);                                  \
        load_split_##S(x, xs, d);                                                                 \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            THREAD_RANGE(n, lo, hi);                                                              \
            seq_dots_##S(w, lo, hi, d, xs, acc + lo);                                             \
            for (int64_t i = lo; i < hi; i++)                                                     \
                out[i] = STORE_##S(acc[i] + (bias ? LOAD_##S(bias[i]) : 0.f));                    \
        }                                                                                         \
        free(acc); free(xs);                                                                      \
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
/* The entries of x kept by Top-K: the k largest |x_j| (0 < k <= d_in), ties at the k-th
 * magnitude going to the lower j, as ascending idx with their values in coef; returns k. */
static int select_topk(const float *x, int d_in, int k, int64_t *idx, float *coef) {
    float *mag = (float *)malloc(sizeof(float) * (size_t)d_in);
    for (int j = 0; j < d_in; j++) mag[j] = fabsf(x[j]);
    float t = kth_largest(mag, d_in, k);
    int above = 0;
    for (int j = 0; j < d_in; j++) above += fabsf(x[j]) > t;
    int ties = k - above, n = 0;
    for (int j = 0; j < d_in && n < k; j++) {
        float m = fabsf(x[j]);
        if (m > t || (m == t && ties-- > 0)) { idx[n] = j; coef[n] = x[j]; n++; }
    }
    free(mag);
    return n;
}

#define DEFINE_TOPK(S, WT)                                                                        \
    void es_topk_linear_##S(const WT *w_t, const WT *x_in, int d_in, int d_out, int k,              \
                            int n_threads, WT *out) {                                            \
        float *x = (float *)malloc(sizeof(float) * (size_t)d_in);                                 \
        int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)k);                            \
        float *coef = (float *)malloc(sizeof(float) * (size_t)k);                                 \
        float *acc = (float *)calloc((size_t)d_out, sizeof(float));                               \
        for (int j = 0; j < d_in; j++) x[j] = LOAD_##S(x_in[j]);                                  \
        int n = select_topk(x, d_in, k, idx, coef);                                               \
        rows_into_##S(w_t, idx, coef, n, d_out, n_threads, acc);                                  \
        store_merged_##S(acc, NULL, out, d_out);                                                  \
        free(acc); free(coef); free(idx); free(x);                                                \
    }

DEFINE_TOPK(bf16, uint16_t)
DEFINE_TOPK(f32, float)

/* Block-quantised weights (q8_0, q4_0): the same kernels over rows of 32-weight blocks. */
#include "quant_rows.h"
