/* Integer dots against block-quantised rows (part of quant_rows.h, which includes this after
 * its format definitions; see that file for the formats). */
/* Dots against block-quantised rows run in integers: the activation is quantised once per
 * call to int8 blocks of 32 with one fp32 scale each (like the q8_0 weights), each block pair
 * is an exact int32 dot (AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw, or plain C), and only the
 * block results are scaled in fp32.  Widening every weight to fp32 instead kept the FP unit
 * busy for ~13-18 cycles per block, 2-3x the time the same bytes take to stream here.
 * q4_0's nibbles are unsigned (n = q + 8): sum n*x - 8*sum x.  The -8*sum x term is kept per
 * block in the lanes vpdpbusd adds into (off), so it costs nothing per row: a scalar
 * correction per block made a serial fp32 chain that bounded the whole GEMV (4 cycles/block).
 * Four accumulators keep the per-block FMAs off one chain too. */
typedef struct {
    int8_t *q;      /* [d] */
    float *s;       /* [d/32] block scales */
    float *sum8;    /* [d/32] 8 * s * sum(q) of the block (the portable path's offset term) */
    int32_t *off;   /* [d/32 * 8] -8 * (sum of q over each 4-byte lane group): q4_0's offset */
} QX;

static void qx_init(QX *qx, const float *x, int d) {
    int nb = d / QK;
    qx->q = (int8_t *)malloc((size_t)d + 64);
    qx->s = (float *)malloc(sizeof(float) * (size_t)(nb + 1));
    qx->sum8 = (float *)malloc(sizeof(float) * (size_t)(nb + 1));
    qx->off = (int32_t *)malloc(sizeof(int32_t) * (size_t)(nb * 8 + 8));
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
        for (int l = 0; l < 8; l++) {
            const int8_t *g = qx->q + b * QK + 4 * l;
            qx->off[b * 8 + l] = -8 * ((int)g[0] + g[1] + g[2] + g[3]);
        }
    }
}
static void qx_free(QX *qx) { free(qx->q); free(qx->s); free(qx->sum8); free(qx->off); }

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#elif defined(__AVX2__)
static inline __m256i dpbusd_avx2(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#define DPBUSD(acc, u, s) dpbusd_avx2((acc), (u), (s))
#endif
#if defined(DPBUSD)
static inline float hsum256(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}
#endif

static inline float idot_q8(const uint8_t *restrict row, const QX *qx, int d, const uint8_t *pf) {
    int nb = d / QK;
#if defined(DPBUSD)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 34;
        if (pf && (b & 1) == 0) PREFETCH(pf + (int64_t)b * 34);
        uint16_t h; memcpy(&h, blk, 2);
        __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
        __m256i x = _mm256_loadu_si256((const __m256i *)(qx->q + b * QK));
        __m256i dp = DPBUSD(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        acc[b & 3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), _mm256_set1_ps(f16_to_f32(h) * qx->s[b]), acc[b & 3]);
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
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
#if defined(DPBUSD)
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 18;
        if (pf && (b & 3) == 0) PREFETCH(pf + (int64_t)b * 18);
        uint16_t h; memcpy(&h, blk, 2);
        __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 2));
        __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
        __m256i x = _mm256_loadu_si256((const __m256i *)(qx->q + b * QK));
        __m256i dp = DPBUSD(_mm256_loadu_si256((const __m256i *)(qx->off + b * 8)), w, x);
        acc[b & 3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), _mm256_set1_ps(f16_to_f32(h) * qx->s[b]), acc[b & 3]);
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
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
    return hsum256(acc);
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


/* q4_1: sum (s n_j + m) x_j = s * sum n_j x_j + m * sum x_j; the unsigned nibbles go straight
 * into vpdpbusd, the min term uses the block's sum of x (four partial sums: no serial chain). */
static inline float idot_q41(const uint8_t *restrict row, const QX *qx, int d, const uint8_t *pf) {
    int nb = d / QK;
    float corr[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(DPBUSD)
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 20;
        if (pf && (b & 3) == 0) PREFETCH(pf + (int64_t)b * 20);
        uint16_t h, hm; memcpy(&h, blk, 2); memcpy(&hm, blk + 2, 2);
        __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));
        __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
        __m256i x = _mm256_loadu_si256((const __m256i *)(qx->q + b * QK));
        __m256i dp = DPBUSD(_mm256_setzero_si256(), w, x);
        acc[b & 3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), _mm256_set1_ps(f16_to_f32(h) * qx->s[b]), acc[b & 3]);
        corr[b & 3] += f16_to_f32(hm) * qx->sum8[b];
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
           + 0.125f * (corr[0] + corr[1] + corr[2] + corr[3]);
#else
    float acc = 0.f;
    if (pf) prefetch_row(pf, ROWB_q41(d));
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 20;
        uint16_t h, hm; memcpy(&h, blk, 2); memcpy(&hm, blk + 2, 2);
        const uint8_t *q = blk + 4;
        const int8_t *x = qx->q + b * QK;
        int s = 0;
        for (int j = 0; j < QK / 2; j++) s += (int)(q[j] & 15) * (int)x[j] + (int)(q[j] >> 4) * (int)x[j + 16];
        acc += f16_to_f32(h) * qx->s[b] * (float)s;
        corr[b & 3] += f16_to_f32(hm) * qx->sum8[b];
    }
    return acc + 0.125f * (corr[0] + corr[1] + corr[2] + corr[3]);
#endif
}
