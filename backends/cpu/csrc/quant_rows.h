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
#define ROWB_q8(d) ((int64_t)(d) / QK * 34)
#define ROWB_q4(d) ((int64_t)(d) / QK * 18)

/* Dots against block-quantised rows run in integers: the activation is quantised once per
 * call to int8 blocks of 32 with one fp32 scale each (like the q8_0 weights), each block pair
 * is an exact int32 dot (AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw, or plain C), and only the
 * block results are scaled in fp32.  Widening every weight to fp32 instead kept the FP unit
 * busy for ~13-18 cycles per block, 2-3x the time the same bytes take to stream here.
 * q4_0's nibbles are unsigned (n = q + 8): sum n*x - 8*sum x, with sum x per block kept. */
typedef struct {
    int8_t *q;      /* [d] */
    float *s;       /* [d/32] block scales */
    float *sum8;    /* [d/32] 8 * s * sum(q) of the block: q4_0's offset term */
} QX;

static void qx_init(QX *qx, const float *x, int d) {
    int nb = d / QK;
    qx->q = (int8_t *)malloc((size_t)d + 64);
    qx->s = (float *)malloc(sizeof(float) * (size_t)(nb + 1));
    qx->sum8 = (float *)malloc(sizeof(float) * (size_t)(nb + 1));
    for (int b = 0; b < nb; b++) {
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[b * QK + j]));
        float s = amax / 127.f, inv = s > 0.f ? 1.f / s : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int q = (int)lrintf(x[b * QK + j] * inv);
            qx->q[b * QK + j] = (int8_t)q;
            sum += q;
        }
        qx->s[b] = s;
        qx->sum8[b] = 8.f * s * (float)sum;
    }
}
static void qx_free(QX *qx) { free(qx->q); free(qx->s); free(qx->sum8); }

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#elif defined(__AVX2__)
static inline __m256i dpbusd_avx2(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#define DPBUSD(acc, u, s) dpbusd_avx2((acc), (u), (s))
#endif

static inline float idot_q8(const uint8_t *restrict row, const QX *qx, int d, const uint8_t *pf) {
    int nb = d / QK;
#if defined(DPBUSD)
    __m256 acc = _mm256_setzero_ps(), acc2 = acc;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 34;
        if (pf && (b & 1) == 0) PREFETCH(pf + (int64_t)b * 34);
        uint16_t h; memcpy(&h, blk, 2);
        __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
        __m256i x = _mm256_loadu_si256((const __m256i *)(qx->q + b * QK));
        __m256i dp = DPBUSD(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        __m256 sc = _mm256_set1_ps(f16_to_f32(h) * qx->s[b]);
        if (b & 1) acc2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), sc, acc2);
        else acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), sc, acc);
    }
    acc = _mm256_add_ps(acc, acc2);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
#else
    float acc = 0.f;
    if (pf) prefetch_row(pf, ROWB_q8(d));
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 34;
        uint16_t h; memcpy(&h, blk, 2);
        const int8_t *q = (const int8_t *)(blk + 2), *x = qx->q + b * QK;
        int s = 0;
        for (int j = 0; j < QK; j++) s += (int)q[j] * (int)x[j];
        acc += f16_to_f32(h) * qx->s[b] * (float)s;
    }
    return acc;
#endif
}

static inline float idot_q4(const uint8_t *restrict row, const QX *qx, int d, const uint8_t *pf) {
    int nb = d / QK;
    float corr = 0.f;
#if defined(DPBUSD)
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps(), acc2 = acc;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 18;
        if (pf && (b & 3) == 0) PREFETCH(pf + (int64_t)b * 18);
        uint16_t h; memcpy(&h, blk, 2);
        __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 2));
        __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
        __m256i x = _mm256_loadu_si256((const __m256i *)(qx->q + b * QK));
        __m256i dp = DPBUSD(_mm256_setzero_si256(), w, x);
        float ws = f16_to_f32(h);
        corr += ws * qx->sum8[b];
        __m256 sc = _mm256_set1_ps(ws * qx->s[b]);
        if (b & 1) acc2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), sc, acc2);
        else acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), sc, acc);
    }
    acc = _mm256_add_ps(acc, acc2);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r))) - corr;
#else
    float acc = 0.f;
    if (pf) prefetch_row(pf, ROWB_q4(d));
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 18;
        uint16_t h; memcpy(&h, blk, 2);
        const uint8_t *q = blk + 2;
        const int8_t *x = qx->q + b * QK;
        int s = 0;
        for (int j = 0; j < QK / 2; j++) s += (int)(q[j] & 15) * (int)x[j] + (int)(q[j] >> 4) * (int)x[j + 16];
        float ws = f16_to_f32(h);
        acc += ws * qx->s[b] * (float)s - ws * qx->sum8[b];
    }
    return acc;
#endif
}

/* An int8 row with one scale for the whole row (the predictor's factors, formats.int8_rows)
 * against a quantised activation: the same integer dot as q8_0, without per-block scales. */
static inline float idot_i8row(const int8_t *restrict row, const QX *qx, int d) {
    int nb = d / QK;
#if defined(DPBUSD)
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(row + b * QK));
        __m256i x = _mm256_loadu_si256((const __m256i *)(qx->q + b * QK));
        __m256i dp = DPBUSD(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), _mm256_set1_ps(qx->s[b]), acc);
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
#else
    float acc = 0.f;
    for (int b = 0; b < nb; b++) {
        int s = 0;
        for (int j = 0; j < QK; j++) s += (int)row[b * QK + j] * (int)qx->q[b * QK + j];
        acc += qx->s[b] * (float)s;
    }
    return acc;
#endif
}

/* out[i - lo] = scale[i] * (row i . x) for int8 rows lo..hi-1; integer dots when the rows are
 * whole blocks, else the fp32 dots of sparse_rows.c. */
static void seq_idots_i8(const int8_t *w, int64_t lo, int64_t hi, int d, const float *x, const QX *qx,
                         const float *scale, float *out) {
    if (d % QK) { seq_dots_i8(w, lo, hi, d, x, scale, out); return; }
    int64_t lead = rows_ahead(d);
    for (int64_t i = lo; i < hi; i++) {
        if (i + lead < hi) prefetch_row(w + (i + lead) * d, d);
        out[i - lo] = scale[i] * idot_i8row(w + i * d, qx, d);
    }
}

static inline void axpy_q8(float a, const uint8_t *restrict row, float *restrict y, int d, const uint8_t *pf) {
    int nb = d / QK;
#if defined(__AVX512F__)
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 34;
        if (pf && (b & 1) == 0) PREFETCH(pf + (int64_t)b * 34);
        uint16_t h; memcpy(&h, blk, 2);
        __m512 s = _mm512_set1_ps(a * f16_to_f32(h));
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
        _mm512_storeu_ps(y + b * QK, _mm512_fmadd_ps(s, w0, _mm512_loadu_ps(y + b * QK)));
        _mm512_storeu_ps(y + b * QK + 16, _mm512_fmadd_ps(s, w1, _mm512_loadu_ps(y + b * QK + 16)));
    }
#else
    if (pf) prefetch_row(pf, ROWB_q8(d));
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 34;
        uint16_t h; memcpy(&h, blk, 2);
        const int8_t *q = (const int8_t *)(blk + 2);
        float s = a * f16_to_f32(h);
        _Pragma("omp simd")
        for (int j = 0; j < QK; j++) y[b * QK + j] += s * (float)q[j];
    }
#endif
}

static inline void axpy_q4(float a, const uint8_t *restrict row, float *restrict y, int d, const uint8_t *pf) {
    int nb = d / QK;
#if defined(__AVX512F__)
    const __m128i m4 = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 18;
        if (pf && (b & 3) == 0) PREFETCH(pf + (int64_t)b * 18);
        uint16_t h; memcpy(&h, blk, 2);
        __m512 s = _mm512_set1_ps(a * f16_to_f32(h));
        __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 2));
        __m128i lo = _mm_sub_epi8(_mm_and_si128(raw, m4), eight);
        __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), eight);
        _mm512_storeu_ps(y + b * QK, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), _mm512_loadu_ps(y + b * QK)));
        _mm512_storeu_ps(y + b * QK + 16, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), _mm512_loadu_ps(y + b * QK + 16)));
    }
#else
    if (pf) prefetch_row(pf, ROWB_q4(d));
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 18;
        uint16_t h; memcpy(&h, blk, 2);
        const uint8_t *q = blk + 2;
        float s = a * f16_to_f32(h);
        _Pragma("omp simd")
        for (int j = 0; j < QK / 2; j++) {
            y[b * QK + j] += s * (float)((q[j] & 15) - 8);
            y[b * QK + j + 16] += s * (float)((q[j] >> 4) - 8);
        }
    }
#endif
}

#define QROW(F, w, i, d) ((w) + (int64_t)(i) * ROWB_##F(d))

/* y += sum_r a[r] * row_r for four rows at once: y's 32-float slice of a block is loaded and
 * stored once per four rows instead of once per row (the stores, not the arithmetic, bound
 * the one-row loop here).  Other targets: four one-row calls. */
#if defined(__AVX512F__)
static inline void deq_q8(const uint8_t *blk, __m512 *w0, __m512 *w1) {
    *w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
    *w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
}
static inline void deq_q4(const uint8_t *blk, __m512 *w0, __m512 *w1) {
    const __m128i m4 = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 2));
    *w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(raw, m4), eight)));
    *w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), eight)));
}
#define DEFINE_AXPY4(F, BB)                                                                       \
    static inline void axpy4_##F(const float *a, const uint8_t *const *rows, float *restrict y, int d, \
                                 const uint8_t *const *pf) {                                     \
        int nb = d / QK;                                                                          \
        for (int b = 0; b < nb; b++) {                                                            \
            __m512 y0 = _mm512_loadu_ps(y + b * QK), y1 = _mm512_loadu_ps(y + b * QK + 16);       \
            for (int r = 0; r < 4; r++) {                                                         \
                const uint8_t *blk = rows[r] + (int64_t)b * BB;                                   \
                if (pf[r] && (b & 1) == 0) PREFETCH(pf[r] + (int64_t)b * BB);                     \
                uint16_t h; memcpy(&h, blk, 2);                                                   \
                __m512 s = _mm512_set1_ps(a[r] * f16_to_f32(h)), w0, w1;                          \
                deq_##F(blk, &w0, &w1);                                                           \
                y0 = _mm512_fmadd_ps(s, w0, y0);                                                  \
                y1 = _mm512_fmadd_ps(s, w1, y1);                                                  \
            }                                                                                     \
            _mm512_storeu_ps(y + b * QK, y0);                                                     \
            _mm512_storeu_ps(y + b * QK + 16, y1);                                                \
        }                                                                                         \
    }
DEFINE_AXPY4(q8, 34)
DEFINE_AXPY4(q4, 18)
#else
#define DEFINE_AXPY4(F)                                                                           \
    static inline void axpy4_##F(const float *a, const uint8_t *const *rows, float *restrict y, int d, \
                                 const uint8_t *const *pf) {                                     \
        for (int r = 0; r < 4; r++) axpy_##F(a[r], rows[r], y, d, pf[r]);                         \
    }
DEFINE_AXPY4(q8)
DEFINE_AXPY4(q4)
#endif

/* out[n] = W x (+ bias), one token, fp32 in and out. */
#define DEFINE_QGEMV(F)                                                                           \
    void es_gemv_##F(const uint8_t *w, const float *x, const float *bias, int n, int d, int n_threads, float *out) { \
        int64_t lead = rows_ahead(ROWB_##F(d));                                                   \
        QX qx;                                                                                    \
        qx_init(&qx, x, d);                                                                       \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            THREAD_RANGE(n, lo, hi);                                                              \
            for (int64_t i = lo; i < hi; i++)                                                     \
                out[i] = idot_##F(QROW(F, w, i, d), &qx, d, i + lead < hi ? QROW(F, w, i + lead, d) : NULL) \
                         + (bias ? bias[i] : 0.f);                                                \
        }                                                                                         \
        qx_free(&qx);                                                                             \
    }

/* out[d_out] = sum_j coef[j] * row idx[j] (idx NULL: row j); threads split the rows. */
#define DEFINE_QROWS(F)                                                                           \
    static void qrows_into_##F(const uint8_t *w, const int64_t *idx, const float *coef, int n,    \
                               int d_out, int n_threads, float *acc) {                           \
        int64_t lead = rows_ahead(ROWB_##F(d_out));                                               \
        _Pragma("omp parallel num_threads(n_threads)")                                            \
        {                                                                                         \
            THREAD_RANGE(n, lo, hi);                                                              \
            float *part = (float *)calloc((size_t)d_out, sizeof(float));                          \
            int64_t j = lo;                                                                       \
            for (; j + 4 <= hi; j += 4) {                                                         \
                const uint8_t *rows[4], *pf[4];                                                   \
                for (int r = 0; r < 4; r++) {                                                     \
                    int64_t at = j + r, ahead = at + lead;                                        \
                    rows[r] = QROW(F, w, idx ? idx[at] : at, d_out);                              \
                    pf[r] = ahead < hi ? QROW(F, w, idx ? idx[ahead] : ahead, d_out) : NULL;      \
                }                                                                                 \
                axpy4_##F(coef + j, rows, part, d_out, pf);                                       \
            }                                                                                     \
            for (; j < hi; j++) {                                                                 \
                const uint8_t *pf = j + lead < hi ? QROW(F, w, idx ? idx[j + lead] : j + lead, d_out) : NULL; \
                axpy_##F(coef[j], QROW(F, w, idx ? idx[j] : j, d_out), part, d_out, pf);          \
            }                                                                                     \
            if (hi > lo) reduce_into(acc, part, d_out);                                           \
            free(part);                                                                           \
        }                                                                                         \
    }                                                                                             \
    void es_weighted_rows_##F(const uint8_t *w, const int64_t *idx, const float *coef, int n, int d_out, \
                              int n_threads, float *out) {                                       \
        memset(out, 0, sizeof(float) * (size_t)d_out);                                            \
        qrows_into_##F(w, idx, coef, n, d_out, n_threads, out);                                   \
    }                                                                                             \
    void es_topk_linear_##F(const uint8_t *w_t, const float *x, int d_in, int d_out, int k,       \
                            int n_threads, float *out) {                                         \
        float *mag = (float *)malloc(sizeof(float) * (size_t)d_in);                               \
        int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)k);                            \
        float *coef = (float *)malloc(sizeof(float) * (size_t)k);                                 \
        for (int j = 0; j < d_in; j++) mag[j] = fabsf(x[j]);                                      \
        float t = kth_largest(mag, d_in, k);                                                      \
        int above = 0;                                                                            \
        for (int j = 0; j < d_in; j++) above += fabsf(x[j]) > t;                                  \
        int ties = k - above, n = 0;                                                              \
        for (int j = 0; j < d_in && n < k; j++) {                                                 \
            float m = fabsf(x[j]);                                                                \
            if (m > t || (m == t && ties-- > 0)) { idx[n] = j; coef[n] = x[j]; n++; }             \
        }                                                                                         \
        memset(out, 0, sizeof(float) * (size_t)d_out);                                            \
        qrows_into_##F(w_t, idx, coef, n, d_out, n_threads, out);                                 \
        free(coef); free(idx); free(mag);                                                         \
    }

/* ReGLU FFN of one token (see es_reglu_ffn_bf16 for the passes); gate, up, down_t are rows
 * of format F, the predictor is int8 rows (qa/sa, qb/sb) or fp32 rows (a_t [r, d], b_t [F, r]),
 * each independently; no predictor at all: exact mode. */
#define DEFINE_QFFN(F)                                                                            \
    void es_reglu_ffn_##F(const float *x, const float *a_t, const float *b_t, const int8_t *qa,   \
                          const float *sa, const int8_t *qb, const float *sb, const float *pred_bias, \
                          const uint8_t *gate, const uint8_t *up, const uint8_t *down_t,          \
                          int d, int r, int f, int n_threads, float *out, int64_t *counts) {      \
        const int pred = a_t || qa;                                                               \
        int64_t n_cand = 0, n_active = 0, lead = rows_ahead(ROWB_##F(d));                         \
        float *t_buf = (float *)malloc(sizeof(float) * (size_t)(r + 1));                          \
        QX qx, qt = {NULL, NULL, NULL};   /* x, and the predictor's hidden t once computed */     \
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
            for (int k = 0; k < nc; k++) {                                                        \
                const uint8_t *pf = k + lead < nc ? QROW(F, gate, ids[k + lead], d) : NULL;       \
                float g = idot_##F(QROW(F, gate, ids[k], d), &qx, d, pf);                         \
                if (g > 0.f) { ids[na] = ids[k]; val[na++] = g; }                                 \
            }                                                                                     \
            for (int k = 0; k < na; k++) {   /* up rows: val becomes the down coefficient */      \
                const uint8_t *pf = k + lead < na ? QROW(F, up, ids[k + lead], d) : NULL;         \
                val[k] *= idot_##F(QROW(F, up, ids[k], d), &qx, d, pf);                           \
            }                                                                                     \
            int k = 0;                                                                            \
            for (; k + 4 <= na; k += 4) {    /* down rows, four at a time */                      \
                const uint8_t *rows[4], *pf[4];                                                   \
                for (int r = 0; r < 4; r++) {                                                     \
                    rows[r] = QROW(F, down_t, ids[k + r], d);                                     \
                    pf[r] = k + r + lead < na ? QROW(F, down_t, ids[k + r + lead], d) : NULL;     \
                }                                                                                 \
                axpy4_##F(val + k, rows, part, d, pf);                                            \
            }                                                                                     \
            for (; k < na; k++) axpy_##F(val[k], QROW(F, down_t, ids[k], d), part, d, NULL);      \
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
DEFINE_QROWS(q8)
DEFINE_QROWS(q4)
DEFINE_QFFN(q8)
DEFINE_QFFN(q4)
