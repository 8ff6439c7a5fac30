/* Four block rows against up to four tokens at once, for the GEMM of a batched decode step or a
 * prefill (es_gemm_*, quant_rows.h); part of quant_rows.h, after quant_dots.h.
 *
 * Why: a 4-bit dot is compute-bound here, not bandwidth-bound (q4_0 on 2 cores: 113 us for one
 * token of a 5632 x 2048 matrix, +95 us for each further token when es_gemm called idot4 once
 * per token), and a good part of each dot is work that depends on the weights only: unpacking
 * the nibbles of a block pair of four rows and converting their eight fp16 scales.  Here that
 * is done once per block pair for all the tokens.  Every (row, token) result goes through the
 * same operations in the same order as idot4_F gives it alone (the scale product w * x, the
 * dpbusd from the same start values, the fma into that row's accumulator, the same reduction),
 * so es_gemm stays bit-identical per token to es_gemv: batched answers equal alone answers. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__F16C__)
/* T (1-4, a constant after inlining) tokens qxs[0..T) -> o[4 t + r]; arguments as DEFINE_IDOT4,
 * whose expressions XQ / XOFF name the token as `qx` */
#define DEFINE_IDOT4T(F, BB, QO, NIB, XQ, XOFF, W)                                                \
    static inline __attribute__((always_inline)) void idot4t_body_##F(                            \
        const uint8_t *const *rows, const QX *qxs, const int T, int d, const uint8_t *const *pf, float *o) { \
        const int nb = d / QK;                                                                    \
        __m512 acc[4][4];                                                                         \
        __m256 mins[4];                                                                           \
        for (int t = 0; t < T; t++) {                                                             \
            mins[t] = _mm256_setzero_ps();                                                        \
            for (int r = 0; r < 4; r++) acc[t][r] = _mm512_setzero_ps();                          \
        }                                                                                         \
        int b = 0;                                                                                \
        for (; b + 2 <= nb; b += 2) {                                                             \
            const int64_t o0 = (int64_t)b * BB, o1 = o0 + BB;                                     \
            if (pf[0])                                                                            \
                for (int r = 0; r < 4; r++) { PREFETCH(pf[r] + o0); if (BB > 32) PREFETCH(pf[r] + o0 + 64); } \
            const __m256 ws = pair_halves4(rows, o0, o1, 0);                                      \
            const __m256 wm = F##_HAS_MIN ? pair_halves4(rows, o0, o1, 2) : _mm256_setzero_ps();  \
            __m512i w[4];                                                                         \
            for (int r = 0; r < 4; r++) w[r] = W(rows[r], o0 + QO, o1 + QO);                      \
            for (int t = 0; t < T; t++) {                                                         \
                const QX *qx = qxs + t;                                                           \
                __m512 sc = _mm512_castps256_ps512(_mm256_mul_ps(ws, XS2(qx->s + b)));            \
                if (F##_HAS_MIN) mins[t] = _mm256_add_ps(mins[t], _mm256_mul_ps(wm, XS2(qx->sum8 + b))); \
                const __m512i xq = _mm512_load_si512(XQ + b * QK), xo = XOFF;                     \
                for (int r = 0; r < 4; r++) {                                                     \
                    __m512i dp = _mm512_dpbusd_epi32(xo, w[r], xq);                               \
                    acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp),                           \
                                                _mm512_permutexvar_ps(scale_idx(r, NIB), sc), acc[t][r]); \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int t = 0; t < T; t++) {                                                             \
            float mn[8];                                                                          \
            _mm256_storeu_ps(mn, mins[t]);                                                        \
            for (int r = 0; r < 4; r++) {                                                         \
                float v = _mm512_reduce_add_ps(acc[t][r]) + 0.125f * (mn[2 * r] + mn[2 * r + 1]); \
                if (b < nb) v += idot_##F##_blocks(rows[r], qxs + t, b, nb, NULL);                \
                o[4 * t + r] = v;                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    static inline void idot4t_##F(const uint8_t *const *rows, const QX *qxs, int T, int d,        \
                                   const uint8_t *const *pf, float *o) {                          \
        switch (T) {                                                                              \
        case 4: idot4t_body_##F(rows, qxs, 4, d, pf, o); break;                                   \
        case 3: idot4t_body_##F(rows, qxs, 3, d, pf, o); break;                                   \
        case 2: idot4t_body_##F(rows, qxs, 2, d, pf, o); break;                                   \
        default: idot4_##F(rows, qxs, d, pf, o);                                                  \
        }                                                                                         \
    }
DEFINE_IDOT4T(q4, q4_BB, q4_QO, 1, qx->qp, _mm512_load_si512(qx->offp + b * 8), nibble_pair)
DEFINE_IDOT4T(q41, q41_BB, q41_QO, 1, qx->qp, _mm512_setzero_si512(), nibble_pair)
DEFINE_IDOT4T(q8, q8_BB, q8_QO, 0, qx->q, _mm512_load_si512(qx->off128 + b * 8), q8_pair)
#else
/* other targets: the one-token four-row dot per token (AVX2 shares less across tokens: its
 * unpacking is fused with the activation's multiply) */
#define DEFINE_IDOT4T(F)                                                                          \
    static inline void idot4t_##F(const uint8_t *const *rows, const QX *qxs, int T, int d,        \
                                  const uint8_t *const *pf, float *o) {                           \
        for (int t = 0; t < T; t++) idot4_##F(rows, qxs + t, d, t ? (const uint8_t *const *)NOPF_T : pf, o + 4 * t); \
    }
static const uint8_t *const NOPF_T[4] = {NULL, NULL, NULL, NULL};
DEFINE_IDOT4T(q4)
DEFINE_IDOT4T(q41)
DEFINE_IDOT4T(q8)
#endif
