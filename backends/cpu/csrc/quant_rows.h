/* Kernels over block-quantised rows (included at the end of sparse_rows.c, whose helpers
 * they use: THREAD_RANGE, rows_ahead, reduce_into, seq_dots_i8/f32, kth_largest).
 *
 * Formats (backends/formats.py is the reference): a row of d weights is d/32 blocks, each an
 * fp16 scale followed by the block's quants, so skipping a row never splits a block and one
 * row is one contiguous stream.
 *   q8_0: 34 bytes per block, w_j = s * q_j with q_j int8;
 *   q4_0: 18 bytes per block, w_j = s * (n_j - 8) with n_j in 0..15; byte i holds n_i in its
 *         low nibble and n_{i+16} in its high nibble (the order that unpacks in two ops).
 * Activations come in and go out as fp32 in natural order.  Row sums (down projection,
 * Top-K) widen each weight to fp32; dots (gate, up, dense linears) quantise the activation
 * to int8 blocks first, see below.  The reference is "de-quantise the rows, then matmul";
 * the dots differ from it by the activation's int8 rounding (~0.4% of a block's max). */

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {                      /* zero or subnormal */
        float f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    u = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

#define QK 32
/* block bytes and where a block's quants start (after the fp16 scale, and q4_1's fp16 min) */
#define q8_BB 34
#define q8_QO 2
#define q4_BB 18
#define q4_QO 2
#define q41_BB 20
#define q41_QO 4
#define ROWB_q8(d) ((int64_t)(d) / QK * q8_BB)
#define ROWB_q4(d) ((int64_t)(d) / QK * q4_BB)
#define ROWB_q41(d) ((int64_t)(d) / QK * q41_BB)   /* q4_1: fp16 scale, fp16 min, 16 bytes of nibbles */

#include "quant_dots.h"
#include "quant_gemm.h"

#define QROW(F, w, i, d) ((w) + (int64_t)(i) * ROWB_##F(d))

#include "quant_gemm_tiles.h"
/* the tiled prompt GEMM's view of each format: 4-bit or not, the fewest tokens it pays from */
#define q4_NIB 1
#define q4_TILE_MIN TILE_MIN_TOKENS
#define q41_NIB 1
#define q41_TILE_MIN TILE_MIN_TOKENS
#define q8_NIB 0
#define q8_TILE_MIN (4 * TILE_MIN_TOKENS)   /* twice the bytes to repack: 218 vs 141 us a token at 8, 137 vs 128 at 16, 80 vs 124 at 64 */

#include "quant_axpy.h"

/* out[i - lo] = row i . x for rows lo..hi-1 of w (hi: the end of the thread's rows, for the
 * prefetch distance), four rows at a time. */
#define DEFINE_QGEMV(F)                                                                           \
    static void dots_range_##F(const uint8_t *w, const QX *qx, int d, int64_t lo, int64_t hi, float *out) { \
        int64_t lead = rows_ahead(ROWB_##F(d)), i = lo;                                           \
        for (; i + 4 <= hi; i += 4) {                                                             \
            const uint8_t *rows[4], *pf[4];                                                       \
            for (int r = 0; r < 4; r++) {                                                         \
                rows[r] = QROW(F, w, i + r, d);                                                   \
                pf[r] = i + 3 + lead < hi ? QROW(F, w, i + r + lead, d) : NULL;                   \
            }                                                                                     \
            idot4_##F(rows, qx, d, pf, out + (i - lo));                                           \
        }                                                                                         \
        for (; i < hi; i++) out[i - lo] = idot_##F(QROW(F, w, i, d), qx, d, NULL);                \
    }                                                                                             \
    /* out[n] = W x (+ bias), one token, fp32 in and out. */                                     \
    void es_gemv_##F(const uint8_t *w, const float *x, const float *bias, int n, int d, int n_threads, float *out) { \
        QX qx;                                                                                    \
        qx_init(&qx, x, d);                                                                       \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            THREAD_RANGE(n, lo, hi);                                                              \
            dots_range_##F(w, &qx, d, lo, hi, out + lo);                                          \
            if (bias) for (int64_t j = lo; j < hi; j++) out[j] += bias[j];                        \
        }                                                                                         \
        qx_free(&qx);                                                                             \
    }                                                                                             \
    /* h[n] = act(gate . x) * (up . x) (act: ReLU or SiLU): both GEMVs and the activation in one \
     * parallel region over one quantised x, each thread on the same rows of both matrices. */    \
    void es_gate_up_##F(const uint8_t *gate, const uint8_t *up, const float *x, int n, int d, int relu, \
                        int n_threads, float *h) {                                                \
        QX qx;                                                                                    \
        qx_init(&qx, x, d);                                                                       \
        float *u = (float *)malloc(sizeof(float) * (size_t)n);                                    \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            THREAD_RANGE(n, lo, hi);                                                              \
            dots_range_##F(gate, &qx, d, lo, hi, h + lo);                                         \
            dots_range_##F(up, &qx, d, lo, hi, u + lo);                                           \
            for (int64_t i = lo; i < hi; i++) {                                                   \
                float g = h[i];                                                                   \
                h[i] = (relu ? (g > 0.f ? g : 0.f) : g / (1.f + expf(-g))) * u[i];                \
            }                                                                                     \
        }                                                                                         \
        free(u);                                                                                  \
        qx_free(&qx);                                                                             \
    }

/* out[T, n] = X W^T (+ bias) for T tokens (a batched decode step, a prompt): each group of four
 * rows is dotted with four tokens at a time (idot4t, quant_gemm.h: the weights' unpacking and
 * scales shared by the tokens), over the same thread ranges and four-row groups as the GEMV, so
 * token t's row equals es_gemv of that token exactly.  For many tokens the rows are taken in
 * tiles of ~GEMM_TILE_BYTES that stay in L2 while every group of four tokens passes over them
 * (their quantised activations, ~10 KB, stay in L1): row by row over all tokens, a prompt's
 * activations streamed from L2 for every four rows and a 64-token GEMM ran at 2/3 of the
 * four-token rate.  The float path instead de-quantised every matrix for every forward.
 * A prompt (es_prompt_gemm_*, from the executor's prompt() scope) first takes each thread's
 * whole 16-row tiles through quant_gemm_tiles.h, which adds in another fp32 order; the rows
 * left over, and every decode batch (es_gemm_*), take the exact path below. */
#define GEMM_TILE_BYTES (128 * 1024)
#if defined(HAVE_GEMM_TILES)   /* whole 16-row tiles of a prompt first (quant_gemm_tiles.h) */
#define GEMM_TILES(F)                                                                             \
    if (prompt && T >= F##_TILE_MIN)                                                             \
        lo = gemm_tiles(w, ROWB_##F(d), F##_BB, F##_QO, F##_NIB, F##_HAS_MIN, qx, d, T, lo, hi, bias, n, out)
#else
#define GEMM_TILES(F) (void)0
#endif
#define DEFINE_QGEMM(F)                                                                           \
    static void gemm_##F(const uint8_t *w, const float *x, const float *bias, int n, int d, int T,  \
                         int n_threads, int prompt, float *out) {                                 \
        QX *qx = (QX *)malloc(sizeof(QX) * (size_t)T);                                            \
        _Pragma("omp parallel for num_threads(n_threads)")                                        \
        for (int t = 0; t < T; t++) qx_init(&qx[t], x + (int64_t)t * d, d);                       \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            THREAD_RANGE(n, lo0, hi);                                                             \
            int64_t lo = lo0;                                                                     \
            GEMM_TILES(F);                                                                        \
            const int64_t lead = rows_ahead(ROWB_##F(d)), end4 = lo + (hi - lo) / 4 * 4;          \
            int64_t tile = GEMM_TILE_BYTES / ROWB_##F(d) / 4 * 4;                                 \
            if (tile < 4) tile = 4;                                                               \
            for (int64_t i0 = lo; i0 < end4; i0 += tile) {   /* a tile of rows stays in L2 ... */ \
                const int64_t i1 = i0 + tile < end4 ? i0 + tile : end4;                           \
                for (int t0 = 0; t0 < T; t0 += 4) {          /* ... while each 4 tokens pass */   \
                    const int m = T - t0 < 4 ? T - t0 : 4;                                        \
                    for (int64_t i = i0; i < i1; i += 4) {                                        \
                        const uint8_t *rows[4], *pf[4];                                           \
                        for (int r = 0; r < 4; r++) {                                             \
                            rows[r] = QROW(F, w, i + r, d);                                       \
                            pf[r] = t0 == 0 && i + 3 + lead < hi ? QROW(F, w, i + r + lead, d) : NULL; \
                        }                                                                         \
                        float o[16];                                                              \
                        idot4t_##F(rows, qx + t0, m, d, pf, o);                                   \
                        for (int t = 0; t < m; t++)                                               \
                            for (int r = 0; r < 4; r++)                                           \
                                out[(int64_t)(t0 + t) * n + i + r] = o[4 * t + r] + (bias ? bias[i + r] : 0.f); \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            int64_t i = end4;                                                                     \
            for (; i < hi; i++)                                                                   \
                for (int t = 0; t < T; t++)                                                       \
                    out[(int64_t)t * n + i] = idot_##F(QROW(F, w, i, d), &qx[t], d, NULL) + (bias ? bias[i] : 0.f); \
        }                                                                                         \
        for (int t = 0; t < T; t++) qx_free(&qx[t]);                                              \
        free(qx);                                                                                 \
    }                                                                                             \
    /* a batched decode step's GEMM: every token's row is es_gemv's, to the bit */                \
    void es_gemm_##F(const uint8_t *w, const float *x, const float *bias, int n, int d, int T,    \
                     int n_threads, float *out) {                                                 \
        gemm_##F(w, x, bias, n, d, T, n_threads, 0, out);                                         \
    }                                                                                             \
    /* a prompt's: from F##_TILE_MIN tokens on, rows in repacked tiles (another fp32 order) */ \
    void es_prompt_gemm_##F(const uint8_t *w, const float *x, const float *bias, int n, int d,    \
                            int T, int n_threads, float *out) {                                   \
        gemm_##F(w, x, bias, n, d, T, n_threads, 1, out);                                         \
    }
DEFINE_QGEMM(q8)
DEFINE_QGEMM(q4)
DEFINE_QGEMM(q41)

/* out[d_out] = sum_j coef[j] * row idx[j] (idx NULL: row j); threads split the rows. */
#define DEFINE_QROWS(F)                                                                           \
    static void qrows_into_##F(const uint8_t *w, const int64_t *idx, const float *coef, int n,    \
                               int d_out, int n_threads, float *acc) {                           \
        int64_t lead = rows_ahead(ROWB_##F(d_out));                                               \
        if (lead < GROUP_ROWS) lead = GROUP_ROWS;   /* the next group while this one streams */    \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            THREAD_RANGE(n, lo, hi);                                                              \
            float *part = (float *)calloc((size_t)d_out, sizeof(float));                          \
            for (int64_t j = lo; j < hi; j += GROUP_ROWS) {                                       \
                const uint8_t *rows[GROUP_ROWS], *pf[GROUP_ROWS];                                 \
                int m = hi - j < GROUP_ROWS ? (int)(hi - j) : GROUP_ROWS;                         \
                for (int r = 0; r < m; r++) {                                                     \
                    int64_t at = j + r, ahead = at + lead;                                        \
                    rows[r] = QROW(F, w, idx ? idx[at] : at, d_out);                              \
                    pf[r] = ahead < hi ? QROW(F, w, idx ? idx[ahead] : ahead, d_out) : NULL;      \
                }                                                                                 \
                axpyg_##F(m, coef + j, rows, part, d_out, pf);                                    \
            }                                                                                     \
            if (hi > lo) reduce_into(acc, part, d_out);                                           \
            free(part);                                                                           \
        }                                                                                         \
    }                                                                                             \
    /* out[T, d_out] = X W_t for T tokens (prefill, batches) over all n rows of W_t [n, d_out]:  \
     * the threads split the output blocks, so each reads its own columns of every row, and a   \
     * group of rows is summed for every token while it sits in L1 (the float path instead      \
     * de-quantised the whole matrix for every call). */                                        \
    void es_rows_gemm_##F(const uint8_t *w, const float *x, int n, int d_out, int T, int n_threads, \
                          float *out) {                                                         \
        memset(out, 0, sizeof(float) * (size_t)T * (size_t)d_out);                                \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            THREAD_RANGE(d_out / QK, b_lo, b_hi);                                                 \
            const int64_t at = b_lo * (ROWB_##F(QK));                                             \
            const int d_sub = (int)(b_hi - b_lo) * QK;                                            \
            const uint8_t *nopf[GROUP_ROWS] = {0};                                                \
            for (int j = 0; j < n && d_sub > 0; j += GROUP_ROWS) {                                \
                const uint8_t *rows[GROUP_ROWS], *pf[GROUP_ROWS];                                 \
                int m = n - j < GROUP_ROWS ? n - j : GROUP_ROWS;                                  \
                for (int r = 0; r < m; r++) {   /* the first token prefetches the next group */   \
                    rows[r] = QROW(F, w, j + r, d_out) + at;                                      \
                    pf[r] = j + GROUP_ROWS + r < n ? QROW(F, w, j + GROUP_ROWS + r, d_out) + at : NULL; \
                }                                                                                 \
                for (int t = 0; t < T; t++)                                                       \
                    axpyg_##F(m, x + (int64_t)t * n + j, rows, out + (int64_t)t * d_out + b_lo * QK, d_sub, \
                              t ? nopf : pf);                                                     \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    void es_weighted_rows_##F(const uint8_t *w, const int64_t *idx, const float *coef, int n, int d_out, \
                              int n_threads, float *out) {                                       \
        memset(out, 0, sizeof(float) * (size_t)d_out);                                            \
        qrows_into_##F(w, idx, coef, n, d_out, n_threads, out);                                   \
    }                                                                                             \
    void es_topk_linear_##F(const uint8_t *w_t, const float *x, int d_in, int d_out, int k,       \
                            int n_threads, float *out) {                                         \
        int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)k);                            \
        float *coef = (float *)malloc(sizeof(float) * (size_t)k);                                 \
        int n = select_topk(x, d_in, k, idx, coef);                                               \
        memset(out, 0, sizeof(float) * (size_t)d_out);                                            \
        qrows_into_##F(w_t, idx, coef, n, d_out, n_threads, out);                                 \
        free(coef); free(idx);                                                                    \
    }

/* o[j] = row ids[j] . x for j < m (m <= 4) of a gathered list; ahead[0..n_ahead) are the ids
 * the loop reaches `lead` rows later, prefetched while these stream. */
#define DEFINE_DOTS_UPTO4(F)                                                                      \
    static inline void dots_upto4_##F(const uint8_t *w, const int *ids, int m, const int *ahead,  \
                                      int n_ahead, const QX *qx, int d, float *o) {               \
        if (m == 4) {                                                                             \
            const uint8_t *rows[4], *pf[4];                                                       \
            for (int r = 0; r < 4; r++) {                                                         \
                rows[r] = QROW(F, w, ids[r], d);                                                  \
                pf[r] = n_ahead >= 4 ? QROW(F, w, ahead[r], d) : NULL;                            \
            }                                                                                     \
            idot4_##F(rows, qx, d, pf, o);                                                        \
            return;                                                                               \
        }                                                                                         \
        for (int r = 0; r < m; r++) o[r] = idot_##F(QROW(F, w, ids[r], d), qx, d, NULL);         \
    }
DEFINE_DOTS_UPTO4(q8)
DEFINE_DOTS_UPTO4(q4)
DEFINE_DOTS_UPTO4(q41)

/* ReGLU FFN of one token (see es_reglu_ffn_bf16 for the passes); gate and up are rows of
 * format F, down_t of format FD (a 4-bit file's down projection, re-quantised across its
 * blocks, is kept at 8 bits), the predictor is int8 rows (qa/sa, qb/sb) or fp32 rows (a_t [r, d], b_t [F, r]),
 * each independently; no predictor at all: exact mode. */
#define DEFINE_QFFN(F, FD)                                                                        \
    void es_reglu_ffn_##F##_##FD(const float *x, const float *a_t, const float *b_t, const int8_t *qa,   \
                          const float *sa, const int8_t *qb, const float *sb, const float *pred_bias, \
                          const uint8_t *gate, const uint8_t *up, const uint8_t *down_t,          \
                          int d, int r, int f, int n_threads, float thr, float *out, int64_t *counts) { \
        const int pred = a_t || qa;                                                               \
        int64_t n_cand = 0, n_active = 0, lead = rows_ahead(ROWB_##F(d));                         \
        float *t_buf = (float *)malloc(sizeof(float) * (size_t)(r + 1));                          \
        QX qx, qt = {0};   /* x, and the predictor's hidden t once computed */     \
        qx_init(&qx, x, d);                                                                       \
        memset(out, 0, sizeof(float) * (size_t)d);                                                \
        _Pragma("omp parallel num_threads(n_threads) reduction(+:n_cand, n_active)")              \
        {                                                                                         \
            if (pred) {                                                                           \
                THREAD_RANGE(r, r_lo, r_hi);                                                      \
                if (qa) seq_idots_i8(qa, r_lo, r_hi, d, x, &qx, sa, t_buf + r_lo);                \
                else seq_dots_f32(a_t, r_lo, r_hi, d, x, t_buf + r_lo);                           \
            }                                                                                     \
            _Pragma("omp barrier")                                                                \
            _Pragma("omp single")                                                                 \
            if (qb && r % QK == 0) qx_init(&qt, t_buf, r);                                        \
            THREAD_RANGE(f, lo, hi);                                                              \
            float *part = (float *)calloc((size_t)d, sizeof(float));                              \
            float *val = (float *)malloc(sizeof(float) * (size_t)(hi - lo + 1));                  \
            int *ids = (int *)malloc(sizeof(int) * (size_t)(hi - lo + 1));                        \
            int nc = 0, na = 0;                                                                   \
            if (qb) seq_idots_i8(qb, lo, hi, r, t_buf, &qt, sb, val);                             \
            else if (pred) seq_dots_f32(b_t, lo, hi, r, t_buf, val);                              \
            for (int64_t i = lo; i < hi; i++)                                                     \
                if (!pred || val[i - lo] + pred_bias[i] > 0.f) ids[nc++] = (int)i;                \
            /* gate rows of the candidates, four at a time; those above thr stay */               \
            for (int k = 0; k < nc; k += 4) {                                                     \
                float g[4];                                                                       \
                int m = nc - k < 4 ? nc - k : 4;                                                  \
                dots_upto4_##F(gate, ids + k, m, ids + k + lead, nc - k - lead, &qx, d, g);       \
                for (int j = 0; j < m; j++)                                                       \
                    if (g[j] > thr) { ids[na] = ids[k + j]; val[na++] = g[j]; }                   \
            }                                                                                     \
            for (int k = 0; k < na; k += 4) {   /* up rows: val becomes the down coefficient */   \
                float u[4];                                                                       \
                int m = na - k < 4 ? na - k : 4;                                                  \
                dots_upto4_##F(up, ids + k, m, ids + k + lead, na - k - lead, &qx, d, u);         \
                for (int j = 0; j < m; j++) val[k + j] *= u[j];                                   \
            }                                                                                     \
            for (int k = 0; k < na; k += GROUP_ROWS) {    /* down rows, a group at a time */      \
                const uint8_t *rows[GROUP_ROWS], *pf[GROUP_ROWS];                                 \
                int m = na - k < GROUP_ROWS ? na - k : GROUP_ROWS;                                \
                for (int r = 0; r < m; r++) {                                                     \
                    rows[r] = QROW(FD, down_t, ids[k + r], d);                                     \
                    int ahead = k + r + (lead < GROUP_ROWS ? GROUP_ROWS : (int)lead);             \
                    pf[r] = ahead < na ? QROW(FD, down_t, ids[ahead], d) : NULL;                  \
                }                                                                                 \
                axpyg_##FD(m, val + k, rows, part, d, pf);                                         \
            }                                                                                     \
            n_cand += nc;                                                                         \
            n_active += na;                                                                       \
            reduce_into(out, part, d);                                                            \
            free(ids); free(val); free(part);                                                     \
        }                                                                                         \
        free(t_buf);                                                                              \
        qx_free(&qx);                                                                             \
        if (qt.q) qx_free(&qt);                                                                   \
        counts[0] = n_cand;                                                                       \
        counts[1] = n_active;                                                                     \
    }

DEFINE_QGEMV(q8)
DEFINE_QGEMV(q4)
DEFINE_QGEMV(q41)
DEFINE_QROWS(q8)
DEFINE_QROWS(q4)
DEFINE_QROWS(q41)
DEFINE_QFFN(q8, q8)
DEFINE_QFFN(q4, q4)
DEFINE_QFFN(q41, q41)
DEFINE_QFFN(q4, q8)
DEFINE_QFFN(q41, q8)
