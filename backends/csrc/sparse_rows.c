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
DEFINE_ROW_OPS(bf16, uint16_t, bf16_to_f32)
DEFINE_ROW_OPS(f32, float, LOAD_F32)

/* Add each thread's partial sum into out (one thread at a time; d floats each). */
static void reduce_into(float *restrict out, const float *restrict part, int d) {
    #pragma omp critical
    for (int i = 0; i < d; i++) out[i] += part[i];
}

/* ReGLU FFN of one token over the neurons that matter.
 *   pred_a_t [r, d], pred_b_t [F, r], pred_bias [F]: low-rank predictor (NULL: every
 *   neuron is a candidate, i.e. exact mode with a dense gate);
 *   gate, up, down_t [F, d].  out [d] is overwritten.  counts[0] = candidates (gate rows
 *   read), counts[1] = active neurons (up/down rows read). */
#define DEFINE_FFN(SUFFIX, WT)                                                                    \
    void es_reglu_ffn_##SUFFIX(const float *x, const WT *pred_a_t, const WT *pred_b_t,              \
                               const float *pred_bias, const WT *gate, const WT *up,              \
                               const WT *down_t, int d, int r, int f, int n_threads,               \
                               float *t_buf, float *out, int64_t *counts) {                       \
        int64_t n_cand = 0, n_active = 0;                                                          \
        memset(out, 0, sizeof(float) * d);                                                        \
        _Pragma("omp parallel num_threads(n_threads) reduction(+:n_cand, n_active)")              \
        {                                                                                         \
            if (pred_a_t) {                                                                       \
                _Pragma("omp for schedule(static)")                                               \
                for (int j = 0; j < r; j++) t_buf[j] = dot_##SUFFIX(pred_a_t + (int64_t)j * d, x, d); \
            }                                                                                     \
            float *part = (float *)calloc((size_t)d, sizeof(float));                              \
            _Pragma("omp for schedule(dynamic, 64)")                                              \
            for (int i = 0; i < f; i++) {                                                         \
                if (pred_a_t &&                                                                   \
                    dot_##SUFFIX(pred_b_t + (int64_t)i * r, t_buf, r) + pred_bias[i] <= 0.f)      \
                    continue;                                                                     \
                n_cand++;                                                                         \
                float g = dot_##SUFFIX(gate + (int64_t)i * d, x, d);                              \
                if (g <= 0.f) continue;                                                           \
                n_active++;                                                                       \
                float h = g * dot_##SUFFIX(up + (int64_t)i * d, x, d);                            \
                axpy_##SUFFIX(h, down_t + (int64_t)i * d, part, d);                               \
            }                                                                                     \
            reduce_into(out, part, d);                                                            \
            free(part);                                                                           \
        }                                                                                         \
        counts[0] = n_cand;                                                                       \
        counts[1] = n_active;                                                                     \
    }

DEFINE_FFN(bf16, uint16_t)
DEFINE_FFN(f32, float)

/* out[d_out] = sum_j coef[j] * w[idx[j]] : the Top-K linear and any down projection over a
 * given row set.  Threads split the output columns, so each reads a disjoint slice of every
 * selected row and no reduction is needed. */
#define DEFINE_ROWS(SUFFIX, WT)                                                                   \
    void es_weighted_rows_##SUFFIX(const WT *w, const int64_t *idx, const float *coef, int n,       \
                                   int d_out, int n_threads, float *out) {                       \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            int nt = omp_get_num_threads(), id = omp_get_thread_num();                           \
            int chunk = ((d_out + nt - 1) / nt + 15) / 16 * 16;                                   \
            int lo = id * chunk, hi = lo + chunk < d_out ? lo + chunk : d_out;                     \
            if (lo < hi) {                                                                        \
                memset(out + lo, 0, sizeof(float) * (hi - lo));                                   \
                for (int j = 0; j < n; j++)                                                       \
                    axpy_##SUFFIX(coef[j], w + idx[j] * (int64_t)d_out + lo, out + lo, hi - lo);  \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_ROWS(bf16, uint16_t)
DEFINE_ROWS(f32, float)
