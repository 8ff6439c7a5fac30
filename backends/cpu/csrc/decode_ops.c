/* Native single-token decode ops besides the weight-streaming kernels: RMSNorm and the
 * attention of one new token (edgesparse.backends.native; cpu backend).  Both replace a run of
 * small torch ops that cost more in dispatch than in arithmetic at batch 1. */
#include "common.h"

/* RMSNorm of one row, as transformers computes it: fp32 mean of squares, x * rsqrt(var + eps)
 * rounded to the activation dtype, then times the weight (rounded again). */
#define DEFINE_RMS_NORM(S, WT)                                                                    \
    void es_rms_norm_##S(const WT *x, const WT *w, float eps, int n, WT *out) {                    \
        float ss = 0.f;                                                                           \
        for (int i = 0; i < n; i++) { float v = LOAD_##S(x[i]); ss += v * v; }                    \
        float r = 1.f / sqrtf(ss / (float)n + eps);                                               \
        for (int i = 0; i < n; i++)                                                               \
            out[i] = STORE_##S(LOAD_##S(w[i]) * LOAD_##S(STORE_##S(LOAD_##S(x[i]) * r)));         \
    }

DEFINE_RMS_NORM(bf16, uint16_t)
DEFINE_RMS_NORM(f32, float)

/* Attention of one new token of one sequence: RoPE (rotate-half convention) on q and k with
 * the roundings of transformers' code in the activation dtype, k and v written into the cache
 * at `slot`, then each query head attends over slots first..slot of its KV group (fp32 scores,
 * softmax and sum; the result rounded once).  Replaces ~25 small torch ops per layer.
 *   qkv [nq + 2 nkv], cos/sin [hd] (this position's RoPE row), cache_k/v [n_kv, max_len, hd],
 *   out [nq]. */
#define ROUND(S, v) LOAD_##S(STORE_##S(v))
#define DEFINE_ATTN(S, WT)                                                                        \
    static void rope_##S(const WT *x, const WT *cos, const WT *sin, int hd, float *out) {         \
        int half = hd / 2;                                                                        \
        for (int i = 0; i < half; i++) {                                                          \
            float a = LOAD_##S(x[i]), b = LOAD_##S(x[i + half]);                                  \
            out[i] = ROUND(S, ROUND(S, a * LOAD_##S(cos[i])) + ROUND(S, -b * LOAD_##S(sin[i])));  \
            out[i + half] = ROUND(S, ROUND(S, b * LOAD_##S(cos[i + half])) +                     \
                                     ROUND(S, a * LOAD_##S(sin[i + half])));                      \
        }                                                                                         \
    }                                                                                             \
    void es_decode_attention_##S(const WT *qkv, const WT *cos, const WT *sin, WT *cache_k,          \
                                 WT *cache_v, int n_heads, int n_kv, int hd, int max_len,         \
                                 int slot, int first, int n_threads, WT *out) {                   \
        const int nq = n_heads * hd, n = slot - first + 1, group = n_heads / n_kv;                \
        const float scale = 1.f / sqrtf((float)hd);                                               \
        float *q = (float *)malloc(sizeof(float) * (size_t)(nq + hd));                            \
        float *kr = q + nq;                                                                       \
        for (int h = 0; h < n_heads; h++) rope_##S(qkv + h * hd, cos, sin, hd, q + h * hd);       \
        for (int g = 0; g < n_kv; g++) {                                                          \
            int64_t at = ((int64_t)g * max_len + slot) * hd;                                      \
            rope_##S(qkv + nq + g * hd, cos, sin, hd, kr);                                        \
            for (int i = 0; i < hd; i++) {                                                        \
                cache_k[at + i] = STORE_##S(kr[i]);                                               \
                cache_v[at + i] = qkv[nq + n_kv * hd + g * hd + i];                               \
            }                                                                                     \
        }                                                                                         \
        _Pragma("omp parallel for num_threads(n_threads) schedule(static) if((int64_t)n * nq > (1 << 17))") \
        for (int h = 0; h < n_heads; h++) {                                                       \
            const int64_t base = (int64_t)(h / group) * max_len * hd + (int64_t)first * hd;       \
            const float *qh = q + h * hd;                                                         \
            float *p = (float *)malloc(sizeof(float) * (size_t)(n + hd)), *acc = p + n, m = -INFINITY; \
            for (int j = 0; j < n; j++) {                                                         \
                const WT *kj = cache_k + base + (int64_t)j * hd;                                  \
                float s = 0.f;                                                                    \
                _Pragma("omp simd reduction(+:s)")                                                \
                for (int i = 0; i < hd; i++) s += qh[i] * LOAD_##S(kj[i]);                        \
                p[j] = s * scale;                                                                 \
                m = p[j] > m ? p[j] : m;                                                          \
            }                                                                                     \
            float sum = 0.f;                                                                      \
            for (int j = 0; j < n; j++) { p[j] = expf(p[j] - m); sum += p[j]; }                   \
            for (int i = 0; i < hd; i++) acc[i] = 0.f;                                            \
            for (int j = 0; j < n; j++) {                                                         \
                const WT *vj = cache_v + base + (int64_t)j * hd;                                  \
                const float pj = p[j] / sum;                                                      \
                _Pragma("omp simd")                                                               \
                for (int i = 0; i < hd; i++) acc[i] += pj * LOAD_##S(vj[i]);                      \
            }                                                                                     \
            for (int i = 0; i < hd; i++) out[h * hd + i] = STORE_##S(acc[i]);                     \
            free(p);                                                                              \
        }                                                                                         \
        free(q);                                                                                  \
    }

DEFINE_ATTN(bf16, uint16_t)
DEFINE_ATTN(f32, float)
