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
    /* For the four-row dots (idot4_*): block pairs in the lane order a 4-bit pair unpacks to,
     * [b0 q0..15 | b1 q0..15 | b0 q16..31 | b1 q16..31], with its offsets; q8_0's offset
     * (-128 * lane group sum, natural order) */
    int8_t *qp;
    int32_t *offp, *off128;
    int32_t *boff;  /* [d/32] -8 * sum of q over the block (the tiled GEMM's q4_0 offset) */
} QX;

static void qx_init(QX *qx, const float *x, int d) {
    int nb = d / QK;
    size_t qbytes = ((size_t)d + 127) / 64 * 64, obytes = (sizeof(int32_t) * (size_t)(nb * 8 + 16) + 63) / 64 * 64;
    qx->q = (int8_t *)aligned_alloc(64, qbytes);
    qx->qp = (int8_t *)aligned_alloc(64, qbytes);
    qx->s = (float *)malloc(sizeof(float) * (size_t)(nb + 2));
    qx->sum8 = (float *)malloc(sizeof(float) * (size_t)(nb + 1));
    qx->off = (int32_t *)aligned_alloc(64, obytes);
    qx->offp = (int32_t *)aligned_alloc(64, obytes);
    qx->off128 = (int32_t *)aligned_alloc(64, obytes);
    qx->boff = (int32_t *)malloc(sizeof(int32_t) * (size_t)(nb + 1));
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
        qx->boff[b] = -8 * sum;
        for (int l = 0; l < 8; l++) {
            const int8_t *g = qx->q + b * QK + 4 * l;
            qx->off[b * 8 + l] = -8 * ((int)g[0] + g[1] + g[2] + g[3]);
            qx->off128[b * 8 + l] = 16 * qx->off[b * 8 + l];
        }
    }
    for (int b = 0; b + 2 <= nb; b += 2) {
        int8_t *dq = qx->qp + b * QK;
        const int8_t *q0 = qx->q + b * QK, *q1 = q0 + QK;
        memcpy(dq, q0, 16); memcpy(dq + 16, q1, 16); memcpy(dq + 32, q0 + 16, 16); memcpy(dq + 48, q1 + 16, 16);
        int32_t *dof = qx->offp + b * 8;
        const int32_t *f0 = qx->off + b * 8, *f1 = f0 + 8;
        memcpy(dof, f0, 16); memcpy(dof + 4, f1, 16); memcpy(dof + 8, f0 + 4, 16); memcpy(dof + 12, f1 + 4, 16);
    }
}
static void qx_free(QX *qx) {
    free(qx->q); free(qx->qp); free(qx->s); free(qx->sum8); free(qx->off); free(qx->offp); free(qx->off128); free(qx->boff);
}

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

/* One block's int32 dot for the paths without x86 SIMD: aarch64 with the dot-product extension
 * (Armv8.2-A and later, e.g. Jetson Orin's Cortex-A78AE) uses
 * sdot, 16 int8 products into four int32 lanes per instruction; elsewhere plain C.  4-bit
 * blocks: byte j holds n_j (low nibble) and n_{j+16} (high), so the two halves meet x[0..15] and
 * x[16..31] as they lie.  Compiled here with the aarch64 cross compiler and run under qemu
 * (tests/backends/test_cpu_arm.py), never on ARM hardware. */
#if defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
static inline int dot32_i8(const int8_t *w, const int8_t *x) {
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), vld1q_s8(w), vld1q_s8(x));
    return vaddvq_s32(vdotq_s32(acc, vld1q_s8(w + 16), vld1q_s8(x + 16)));
}
static inline int dot32_nib(const uint8_t *q, const int8_t *x) {
    uint8x16_t raw = vld1q_u8(q);
    int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f)));
    int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
    return vaddvq_s32(vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(x)), hi, vld1q_s8(x + 16)));
}
#else
static inline int dot32_i8(const int8_t *w, const int8_t *x) {
    int s = 0;
    for (int j = 0; j < QK; j++) s += (int)w[j] * (int)x[j];
    return s;
}
static inline int dot32_nib(const uint8_t *q, const int8_t *x) {
    int s = 0;
    for (int j = 0; j < QK / 2; j++) s += (int)(q[j] & 15) * (int)x[j] + (int)(q[j] >> 4) * (int)x[j + 16];
    return s;
}
#endif

static inline float idot_q8_blocks(const uint8_t *restrict row, const QX *qx, int b0, int nb, const uint8_t *pf) {
#if defined(DPBUSD)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = b0; b < nb; b++) {
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
    if (pf) prefetch_row(pf, (int64_t)(nb - b0) * 34);
    for (int b = b0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 34;
        uint16_t h; memcpy(&h, blk, 2);
        int s = dot32_i8((const int8_t *)(blk + 2), qx->q + b * QK);
        acc += f16_to_f32(h) * qx->s[b] * (float)s;
    }
    return acc;
#endif
}

static inline float idot_q4_blocks(const uint8_t *restrict row, const QX *qx, int b0, int nb, const uint8_t *pf) {
#if defined(DPBUSD)
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = b0; b < nb; b++) {
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
    if (pf) prefetch_row(pf, (int64_t)(nb - b0) * 18);
    for (int b = b0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 18;
        uint16_t h; memcpy(&h, blk, 2);
        int s = dot32_nib(blk + 2, qx->q + b * QK);
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
        acc += qx->s[b] * (float)dot32_i8(row + b * QK, qx->q + b * QK);
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
static inline float idot_q41_blocks(const uint8_t *restrict row, const QX *qx, int b0, int nb, const uint8_t *pf) {
    float corr[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(DPBUSD)
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = b0; b < nb; b++) {
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
    if (pf) prefetch_row(pf, (int64_t)(nb - b0) * 20);
    for (int b = b0; b < nb; b++) {
        const uint8_t *blk = row + (int64_t)b * 20;
        uint16_t h, hm; memcpy(&h, blk, 2); memcpy(&hm, blk + 2, 2);
        int s = dot32_nib(blk + 4, qx->q + b * QK);
        acc += f16_to_f32(h) * qx->s[b] * (float)s;
        corr[b & 3] += f16_to_f32(hm) * qx->sum8[b];
    }
    return acc + 0.125f * (corr[0] + corr[1] + corr[2] + corr[3]);
#endif
}

#define idot_q8(row, qx, d, pf) idot_q8_blocks((row), (qx), 0, (d) / QK, (pf))
#define idot_q4(row, qx, d, pf) idot_q4_blocks((row), (qx), 0, (d) / QK, (pf))
#define idot_q41(row, qx, d, pf) idot_q41_blocks((row), (qx), 0, (d) / QK, (pf))

/* Four rows at once: o[r] = rows[r] . x.  On AVX-512 VNNI each step takes a pair of blocks of
 * all four rows in 512-bit registers: the activation's pair, its offsets and scales are loaded
 * once for four rows, and the eight fp16 weight scales are converted in one instruction.  The
 * one-row-one-block loop above was compute-bound (~10 GB/s of q4_0 per core with its rows in
 * L2, under the ~14 GB/s a core streams from memory); this runs at ~17 (docs/performance.md).
 * An odd last block, and other targets, take the one-row dots. */
#if defined(DPBUSD) && defined(__F16C__)
/* [s(r0,b0), s(r0,b1), s(r1,b0), ..., s(r3,b1)]: the eight fp16 scales (sh 0) or minimums
 * (q4_1, sh 2) of a block pair of four rows, as fp32 */
static inline __m256 pair_halves4(const uint8_t *const *rows, int64_t o0, int64_t o1, int sh) {
    uint16_t h[8];
    for (int r = 0; r < 4; r++) { memcpy(h + 2 * r, rows[r] + o0 + sh, 2); memcpy(h + 2 * r + 1, rows[r] + o1 + sh, 2); }
    return _mm256_cvtph_ps(_mm_set_epi16(h[7], h[6], h[5], h[4], h[3], h[2], h[1], h[0]));
}
/* the activation's pair of block scales in every lane pair: [x_b0, x_b1] x 4 */
#define XS2(p) _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(p)))
/* pair_halves4 * the activation's pair scales */
static inline __m256 pair_scales4(const uint8_t *const *rows, int64_t o0, int64_t o1, int sh, const float *xs) {
    return _mm256_mul_ps(pair_halves4(rows, o0, o1, sh), XS2(xs));
}
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* lane -> scale index of row r: 4-bit pairs unpack to [b0 | b1 | b0 | b1] lane groups of four,
 * q8_0 pairs to [b0 x8 | b1 x8] */
static inline __m512i scale_idx(int r, int nibbles) {
    __m512i i = nibbles ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                        : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_add_epi32(i, _mm512_set1_epi32(2 * r));
}
static inline __m512i nibble_pair(const uint8_t *row, int64_t o0, int64_t o1) {
    __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(row + o0))),
                                          _mm_loadu_si128((const __m128i *)(row + o1)), 1);
    return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1),
                            _mm512_set1_epi8(0x0f));
}
/* F: format, BB: block bytes, QO: offset of the quants in a block, NIB: 4-bit, XQ/XOFF: the
 * activation's quants and dpbusd start values for a pair, W: the row's unsigned pair. */
#define DEFINE_IDOT4(F, BB, QO, NIB, XQ, XOFF, W)                                                 \
    static inline void idot4_##F(const uint8_t *const *rows, const QX *qx, int d, const uint8_t *const *pf, float *o) { \
        const int nb = d / QK;                                                                    \
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}; \
        __m256 mins = _mm256_setzero_ps();                                                        \
        int b = 0;                                                                                \
        for (; b + 2 <= nb; b += 2) {                                                             \
            const int64_t o0 = (int64_t)b * BB, o1 = o0 + BB;                                     \
            if (pf[0])                                                                            \
                for (int r = 0; r < 4; r++) { PREFETCH(pf[r] + o0); if (BB > 32) PREFETCH(pf[r] + o0 + 64); } \
            __m512 sc = _mm512_castps256_ps512(pair_scales4(rows, o0, o1, 0, qx->s + b));         \
            if (F##_HAS_MIN) /* q4_1: + m * sum(x) of each block */                               \
                mins = _mm256_add_ps(mins, pair_scales4(rows, o0, o1, 2, qx->sum8 + b));          \
            const __m512i xq = _mm512_load_si512(XQ + b * QK), xo = XOFF;                         \
            for (int r = 0; r < 4; r++) {                                                         \
                __m512i dp = _mm512_dpbusd_epi32(xo, W(rows[r], o0 + QO, o1 + QO), xq);           \
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_permutexvar_ps(scale_idx(r, NIB), sc), acc[r]); \
            }                                                                                     \
        }                                                                                         \
        float mn[8];                                                                              \
        _mm256_storeu_ps(mn, mins);                                                               \
        for (int r = 0; r < 4; r++) {                                                             \
            o[r] = _mm512_reduce_add_ps(acc[r]) + 0.125f * (mn[2 * r] + mn[2 * r + 1]);           \
            if (b < nb) o[r] += idot_##F##_blocks(rows[r], qx, b, nb, NULL);                      \
        }                                                                                         \
    }
#define q4_HAS_MIN 0
#define q41_HAS_MIN 1
#define q8_HAS_MIN 0
/* q8_0: int8 weights made unsigned (w + 128, an xor), the 128 * sum x it adds taken off in
 * the start values */
static inline __m512i q8_pair(const uint8_t *row, int64_t o0, int64_t o1) {
    __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(row + o0))),
                                   _mm256_loadu_si256((const __m256i *)(row + o1)), 1);
    return _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
}
DEFINE_IDOT4(q4, q4_BB, q4_QO, 1, qx->qp, _mm512_load_si512(qx->offp + b * 8), nibble_pair)
DEFINE_IDOT4(q41, q41_BB, q41_QO, 1, qx->qp, _mm512_setzero_si512(), nibble_pair)
DEFINE_IDOT4(q8, q8_BB, q8_QO, 0, qx->q, _mm512_load_si512(qx->off128 + b * 8), q8_pair)
#elif defined(DPBUSD) && defined(__F16C__)
/* AVX2 (no VNNI): a pair of blocks of one row per step, four rows sharing the activation's
 * loads and one conversion of their eight fp16 scales.  A 4-bit pair unpacks to [b0 lo | b1 lo]
 * and [b0 hi | b1 hi] against the activation's pair layout (qp); the two vpmaddubsw products
 * are added as int16 (|sum| <= 4 * 15 * 127, no saturation) so one vpmaddwd, one conversion
 * and one FMA serve two blocks.  The -8 of q4_0 and the min of q4_1 are one scalar term per
 * block (s_w * 8 * s_x * sum q, from sum8), summed in a vector beside the dots. */
static inline __m256 row_scales(__m256 sc, int r) {   /* lanes 0-3: row r's b0, 4-7: its b1 */
    return _mm256_permutevar8x32_ps(sc, _mm256_set_epi32(2 * r + 1, 2 * r + 1, 2 * r + 1, 2 * r + 1, 2 * r, 2 * r, 2 * r, 2 * r));
}
static inline __m256i nibble_pair_dot(const uint8_t *row, int64_t o0, int64_t o1, __m256i xlo, __m256i xhi) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(row + o0))),
                                          _mm_loadu_si128((const __m128i *)(row + o1)), 1);
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(raw, m4), xlo),
                                 _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), xhi));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
/* F: format, BB: block bytes, QO: offset of the quants, MS: sign of the per-block sum8 term
 * (q4_0: -8 s_w, read at the scale; q4_1: + m / 8, read at the min, offset 2) */
#define DEFINE_IDOT4(F, BB, QO, MS, MO)                                                           \
    static inline void idot4_##F(const uint8_t *const *rows, const QX *qx, int d, const uint8_t *const *pf, float *o) { \
        const int nb = d / QK;                                                                    \
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        __m256 mins = _mm256_setzero_ps();                                                        \
        int b = 0;                                                                                \
        for (; b + 2 <= nb; b += 2) {                                                             \
            const int64_t o0 = (int64_t)b * BB, o1 = o0 + BB;                                     \
            if (pf[0])                                                                            \
                for (int r = 0; r < 4; r++) PREFETCH(pf[r] + o0);                                 \
            __m256 sc = pair_scales4(rows, o0, o1, 0, qx->s + b);                                 \
            mins = _mm256_add_ps(mins, pair_scales4(rows, o0, o1, MO, qx->sum8 + b));             \
            const __m256i xlo = _mm256_load_si256((const __m256i *)(qx->qp + b * QK));            \
            const __m256i xhi = _mm256_load_si256((const __m256i *)(qx->qp + b * QK + 32));       \
            for (int r = 0; r < 4; r++) {                                                         \
                __m256i dp = nibble_pair_dot(rows[r], o0 + QO, o1 + QO, xlo, xhi);                \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), row_scales(sc, r), acc[r]);      \
            }                                                                                     \
        }                                                                                         \
        float mn[8];                                                                              \
        _mm256_storeu_ps(mn, mins);                                                               \
        for (int r = 0; r < 4; r++) {                                                             \
            o[r] = hsum256(acc[r]) + (MS) * (mn[2 * r] + mn[2 * r + 1]);                          \
            if (b < nb) o[r] += idot_##F##_blocks(rows[r], qx, b, nb, NULL);                      \
        }                                                                                         \
    }
DEFINE_IDOT4(q4, 18, 2, -1.f, 0)
DEFINE_IDOT4(q41, 20, 4, 0.125f, 2)
/* q8_0: each block its own vpmaddwd (signed products of two blocks would saturate int16);
 * the four rows still share the activation's loads and the scale conversion. */
static inline void idot4_q8(const uint8_t *const *rows, const QX *qx, int d, const uint8_t *const *pf, float *o) {
    const int nb = d / QK;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i one = _mm256_set1_epi16(1);
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const int64_t o0 = (int64_t)b * 34, o1 = o0 + 34;
        if (pf[0])
            for (int r = 0; r < 4; r++) { PREFETCH(pf[r] + o0); PREFETCH(pf[r] + o0 + 64); }
        __m256 sc = pair_scales4(rows, o0, o1, 0, qx->s + b);
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(qx->q + b * QK));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(qx->q + b * QK + QK));
        for (int r = 0; r < 4; r++) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(rows[r] + o0 + 2));
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(rows[r] + o1 + 2));
            __m256i d0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0)), one);
            __m256i d1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(x1, w1)), one);
            /* lanes 0-3 of hadd's halves: b0, lanes 4-7... interleaved: see the index below */
            __m256i dp = _mm256_hadd_epi32(d0, d1);
            __m256 s = _mm256_permutevar8x32_ps(sc, _mm256_set_epi32(2 * r + 1, 2 * r + 1, 2 * r, 2 * r, 2 * r + 1, 2 * r + 1, 2 * r, 2 * r));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), s, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        o[r] = hsum256(acc[r]);
        if (b < nb) o[r] += idot_q8_blocks(rows[r], qx, b, nb, NULL);
    }
}
#else
#define DEFINE_IDOT4(F)                                                                           \
    static inline void idot4_##F(const uint8_t *const *rows, const QX *qx, int d, const uint8_t *const *pf, float *o) { \
        for (int r = 0; r < 4; r++) o[r] = idot_##F(rows[r], qx, d, pf[r]);                       \
    }
DEFINE_IDOT4(q4)
DEFINE_IDOT4(q41)
DEFINE_IDOT4(q8)
#endif
