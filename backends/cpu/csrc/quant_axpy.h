/* Row sums over block-quantised rows, y += sum_r a[r] * row_r in fp32: the down projection
 * (neuron-major) and Top-K linears (part of quant_rows.h, which includes this after its
 * format definitions and QROW).  axpy_F: one row; axpy4_F: four rows sharing y's loads and
 * stores. */
#if defined(__AVX512F__)
/* y[0..31] += a * (the block's weights).  4-bit blocks: the 16 possible weights a*s*(n - 8)
 * (q4_0) or a*(s*n + m) (q4_1) are one register, and each nibble picks its weight with a
 * permute (vpermps reads only an index's low 4 bits, so the high nibble needs no mask): two
 * fewer instructions per block than widening each nibble to fp32 and multiplying, which
 * made this loop compute-bound (~9 GB/s of q4_0 per core with its rows in L2; now ~12). */
static inline void acc_q8(const uint8_t *blk, float a, __m512 *y0, __m512 *y1) {
    uint16_t h; memcpy(&h, blk, 2);
    __m512 s = _mm512_set1_ps(a * f16_to_f32(h));
    *y0 = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)))), *y0);
    *y1 = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)))), *y1);
}
static inline void acc_nibbles(const uint8_t *q, __m512 table, __m512 *y0, __m512 *y1) {
    __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    *y0 = _mm512_add_ps(*y0, _mm512_permutexvar_ps(lo, table));
    *y1 = _mm512_add_ps(*y1, _mm512_permutexvar_ps(_mm512_srli_epi32(lo, 4), table));
}
static inline __m512 nibble_values(void) {
    return _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
}
static inline void acc_q4(const uint8_t *blk, float a, __m512 *y0, __m512 *y1) {
    uint16_t h; memcpy(&h, blk, 2);
    __m512 s = _mm512_set1_ps(a * f16_to_f32(h));
    acc_nibbles(blk + 2, _mm512_mul_ps(_mm512_sub_ps(nibble_values(), _mm512_set1_ps(8.f)), s), y0, y1);
}
static inline void acc_q41(const uint8_t *blk, float a, __m512 *y0, __m512 *y1) {
    uint16_t h, hm; memcpy(&h, blk, 2); memcpy(&hm, blk + 2, 2);
    __m512 t = _mm512_fmadd_ps(nibble_values(), _mm512_set1_ps(a * f16_to_f32(h)), _mm512_set1_ps(a * f16_to_f32(hm)));
    acc_nibbles(blk + 4, t, y0, y1);
}
/* Row sums y += sum_r a[r] * row_r (fp32).  On AVX-512 one kernel serves one row (tails) and
 * four rows at once (the bulk): y's 32-float slice of a block is loaded and stored once per
 * four rows instead of once per row (the stores, not the arithmetic, bound the one-row loop
 * here).  Elsewhere: a plain C loop per row. */
#define DEFINE_AXPY(F, BB)                                                                        \
    static inline void axpyn_##F(int nr, const float *a, const uint8_t *const *rows, float *restrict y, \
                                 int d, const uint8_t *const *pf) {                              \
        int nb = d / QK;                                                                          \
        for (int b = 0; b < nb; b++) {                                                            \
            __m512 y0 = _mm512_loadu_ps(y + b * QK), y1 = _mm512_loadu_ps(y + b * QK + 16);       \
            for (int r = 0; r < nr; r++) {                                                        \
                const uint8_t *blk = rows[r] + (int64_t)b * BB;                                   \
                if (pf[r] && (BB > 32 || (b & 1) == 0)) PREFETCH(pf[r] + (int64_t)b * BB);                     \
                acc_##F(blk, a[r], &y0, &y1);                                                     \
            }                                                                                     \
            _mm512_storeu_ps(y + b * QK, y0);                                                     \
            _mm512_storeu_ps(y + b * QK + 16, y1);                                                \
        }                                                                                         \
    }
DEFINE_AXPY(q8, 34)
DEFINE_AXPY(q4, 18)
DEFINE_AXPY(q41, 20)
#elif defined(__AVX2__) && defined(__F16C__)
/* AVX2: the same four-rows-per-block structure in 256-bit halves (y's 32 floats are four
 * registers, loaded and stored once per four rows).  Each weight is widened to fp32 and
 * FMAed with a * s; the 4-bit formats' offset (q4_0: -8 s, q4_1: m) is one scalar per row and
 * block, summed over the rows and added once per block. */
static inline void acc8_f(__m128i q8, __m256 s, __m256 *y) {   /* 8 int32-able bytes -> y += s * q */
    *y = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), *y);
}
static inline void accn_f(__m128i n8, __m256 s, __m256 *y) {   /* unsigned nibble bytes */
    *y = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(n8)), *y);
}
static inline float acc_q8(const uint8_t *blk, float a, __m256 *y) {
    uint16_t h; memcpy(&h, blk, 2);
    __m256 s = _mm256_set1_ps(a * f16_to_f32(h));
    __m128i q0 = _mm_loadu_si128((const __m128i *)(blk + 2)), q1 = _mm_loadu_si128((const __m128i *)(blk + 18));
    acc8_f(q0, s, y); acc8_f(_mm_srli_si128(q0, 8), s, y + 1);
    acc8_f(q1, s, y + 2); acc8_f(_mm_srli_si128(q1, 8), s, y + 3);
    return 0.f;
}
static inline void acc_nib(const uint8_t *q, __m256 s, __m256 *y) {
    const __m128i m4 = _mm_set1_epi8(0x0f);
    __m128i raw = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
    accn_f(lo, s, y); accn_f(_mm_srli_si128(lo, 8), s, y + 1);
    accn_f(hi, s, y + 2); accn_f(_mm_srli_si128(hi, 8), s, y + 3);
}
static inline float acc_q4(const uint8_t *blk, float a, __m256 *y) {
    uint16_t h; memcpy(&h, blk, 2);
    float s = a * f16_to_f32(h);
    acc_nib(blk + 2, _mm256_set1_ps(s), y);
    return -8.f * s;
}
static inline float acc_q41(const uint8_t *blk, float a, __m256 *y) {
    uint16_t h, hm; memcpy(&h, blk, 2); memcpy(&hm, blk + 2, 2);
    acc_nib(blk + 4, _mm256_set1_ps(a * f16_to_f32(h)), y);
    return a * f16_to_f32(hm);
}
#define DEFINE_AXPY(F, BB)                                                                        \
    static inline void axpyn_##F(int nr, const float *a, const uint8_t *const *rows, float *restrict y, \
                                 int d, const uint8_t *const *pf) {                              \
        int nb = d / QK;                                                                          \
        for (int b = 0; b < nb; b++) {                                                            \
            __m256 v[4];                                                                          \
            for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps(y + b * QK + 8 * j);               \
            float c = 0.f;                                                                        \
            for (int r = 0; r < nr; r++) {                                                        \
                const uint8_t *blk = rows[r] + (int64_t)b * BB;                                   \
                if (pf[r] && (BB > 32 || (b & 1) == 0)) PREFETCH(pf[r] + (int64_t)b * BB);         \
                c += acc_##F(blk, a[r], v);                                                       \
            }                                                                                     \
            const __m256 cv = _mm256_set1_ps(c);                                                  \
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(y + b * QK + 8 * j, _mm256_add_ps(v[j], cv)); \
        }                                                                                         \
    }
DEFINE_AXPY(q8, 34)
DEFINE_AXPY(q4, 18)
DEFINE_AXPY(q41, 20)
/* 4-bit row sums in integers (AVX2).  Widening every weight to fp32 costs ~18 vector uops per
 * 32 weights, about twice a dot's, which made the neuron-major down projection and Top-K
 * linears compute-bound at half the speed of the GEMV over the same bytes.  Here up to 16
 * rows go together: per block, each row's coefficient a_r * s_rb is rounded to int8 on a
 * scale shared by the group's rows (S_b = max_r |a_r s_rb| / 127; the dots round their
 * activation the same way, over 32 inputs), two rows' nibbles are interleaved byte by byte
 * and one vpmaddubsw multiplies both rows by their coefficients for 16 outputs at once.  16
 * rows of int16 sums cannot overflow: 8 pairs x 2 x 15 x 127 = 30480.  Only the group's sum
 * is widened to fp32, once per block: ~0.22 uops per weight instead of ~0.56.  The nibbles are
 * centred (n - 8) in integers, 8 * sum_r q_rb, so the rounding of a coefficient meets weights
 * of at most 8 rather than 15; q4_1's min and its +8 s go in fp32 (sum_r a_r (m_rb + 8 s_rb)),
 * so it rounds like q4_0.  Blocks go in
 * chunks of 64 so the coefficients stay on the stack and the rows' lines in L1 between the
 * pass that reads the scales and the one that reads the nibbles. */
#define GROUP_ROWS 16
#define CHUNK_BLOCKS 64
static inline void axpyg_4bit(int nr, const float *a, const uint8_t *const *rows, float *restrict y, int d,
                              const uint8_t *const *pf, int bb, int q41) {
    const int nb = d / QK, np = (nr + 1) / 2, qoff = q41 ? 4 : 2;
    const __m256i m4w = _mm256_set1_epi8(0x0f);
    float cf[GROUP_ROWS][CHUNK_BLOCKS], sc[CHUNK_BLOCKS], mn[CHUNK_BLOCKS];
    int16_t qp[GROUP_ROWS / 2][CHUNK_BLOCKS], off[CHUNK_BLOCKS];
    uint16_t h[CHUNK_BLOCKS + 8], hm[CHUNK_BLOCKS + 8];
    for (int b0 = 0; b0 < nb; b0 += CHUNK_BLOCKS) {
        const int nc = nb - b0 < CHUNK_BLOCKS ? nb - b0 : CHUNK_BLOCKS, nv = (nc + 7) / 8 * 8;
        /* coefficients: fp16 scales gathered by scalar loads (load ports, not vector pipes) */
        for (int b = 0; b < nv; b++) mn[b] = 0.f;
        for (int r = 0; r < nr; r++) {
            const uint8_t *row = rows[r] + (int64_t)b0 * bb;
            for (int b = 0; b < nc; b++) memcpy(&h[b], row + (int64_t)b * bb, 2);
            for (int b = nc; b < nv; b++) h[b] = 0;
            const __m256 ar = _mm256_set1_ps(a[r]);
            for (int b = 0; b < nv; b += 8)
                _mm256_storeu_ps(&cf[r][b], _mm256_mul_ps(ar, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + b)))));
            if (q41) {
                for (int b = 0; b < nc; b++) memcpy(&hm[b], row + (int64_t)b * bb + 2, 2);
                for (int b = nc; b < nv; b++) hm[b] = 0;
                for (int b = 0; b < nv; b += 8)   /* a_r (m + 8 s): the nibbles are centred as in q4_0 */
                    _mm256_storeu_ps(mn + b, _mm256_add_ps(_mm256_loadu_ps(mn + b), _mm256_fmadd_ps(
                        ar, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(hm + b))),
                        _mm256_mul_ps(_mm256_set1_ps(8.f), _mm256_loadu_ps(&cf[r][b])))));
            }
        }
        const __m256 sign = _mm256_set1_ps(-0.f);
        for (int b = 0; b < nv; b += 8) {
            __m256 mx = _mm256_setzero_ps();
            for (int r = 0; r < nr; r++) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(&cf[r][b])));
            const __m256 pos = _mm256_cmp_ps(mx, _mm256_setzero_ps(), _CMP_GT_OQ);
            const __m256 inv = _mm256_and_ps(pos, _mm256_div_ps(_mm256_set1_ps(127.f), mx));
            _mm256_storeu_ps(sc + b, _mm256_mul_ps(mx, _mm256_set1_ps(1.f / 127.f)));
            __m256i tot = _mm256_setzero_si256();
            for (int p = 0; p < np; p++) {
                __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(&cf[2 * p][b]), inv));
                __m256i q1 = 2 * p + 1 < nr ? _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(&cf[2 * p + 1][b]), inv))
                                            : _mm256_setzero_si256();
                tot = _mm256_add_epi32(tot, _mm256_add_epi32(q0, q1));
                /* (q1 << 8) | (q0 & 0xff) is in int16 range: one pack, lanes put back in order */
                __m256i w = _mm256_or_si256(_mm256_slli_epi32(q1, 8), _mm256_and_si256(q0, _mm256_set1_epi32(0xff)));
                w = _mm256_permute4x64_epi64(_mm256_packs_epi32(w, w), 0x08);
                _mm_storeu_si128((__m128i *)&qp[p][b], _mm256_castsi256_si128(w));
            }
            tot = _mm256_slli_epi32(tot, 3);   /* 8 * sum_r q_rb, |.| <= 16256 */
            tot = _mm256_permute4x64_epi64(_mm256_packs_epi32(tot, tot), 0x08);
            _mm_storeu_si128((__m128i *)(off + b), _mm256_castsi256_si128(tot));
        }
        for (int b = 0; b < nc; b++) {
            const int64_t at = (int64_t)(b0 + b) * bb;
            __m256i lo = _mm256_setzero_si256(), hi = lo;
            for (int p = 0; p < np; p++) {
                const uint8_t *r0 = rows[2 * p], *r1 = 2 * p + 1 < nr ? rows[2 * p + 1] : r0;
                if ((b & 1) == 0) {
                    if (pf[2 * p]) PREFETCH(pf[2 * p] + at);
                    if (2 * p + 1 < nr && pf[2 * p + 1]) PREFETCH(pf[2 * p + 1] + at);
                }
                __m128i x0 = _mm_loadu_si128((const __m128i *)(r0 + at + qoff));
                __m128i x1 = _mm_loadu_si128((const __m128i *)(r1 + at + qoff));
                __m256i t = _mm256_set_m128i(_mm_unpackhi_epi8(x0, x1), _mm_unpacklo_epi8(x0, x1));
                const __m256i c = _mm256_set1_epi16(qp[p][b]);
                lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(t, m4w), c));
                hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(t, 4), m4w), c));
            }
            const __m256i o = _mm256_set1_epi16(off[b]);
            lo = _mm256_sub_epi16(lo, o);
            hi = _mm256_sub_epi16(hi, o);
            const __m256 s = _mm256_set1_ps(sc[b]), m = _mm256_set1_ps(mn[b]);
            float *yb = y + (int64_t)(b0 + b) * QK;
            const __m128i part[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                     _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
            for (int j = 0; j < 4; j++) {
                __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part[j]));
                _mm256_storeu_ps(yb + 8 * j, _mm256_add_ps(_mm256_fmadd_ps(s, v, _mm256_loadu_ps(yb + 8 * j)), m));
            }
        }
    }
}
static inline void axpyg_q4(int nr, const float *a, const uint8_t *const *rows, float *restrict y, int d,
                            const uint8_t *const *pf) {
    axpyg_4bit(nr, a, rows, y, d, pf, 18, 0);
}
static inline void axpyg_q41(int nr, const float *a, const uint8_t *const *rows, float *restrict y, int d,
                             const uint8_t *const *pf) {
    axpyg_4bit(nr, a, rows, y, d, pf, 20, 1);
}
#define HAVE_AXPYG_4BIT 1
#else
/* One row: w_j = s * q_j (q8_0), s * (n_j - 8) (q4_0), s * n_j + m (q4_1). */
static inline void axpy_q8(float a, const uint8_t *restrict row, float *restrict y, int d, const uint8_t *pf) {
    if (pf) prefetch_row(pf, ROWB_q8(d));
    for (int b = 0; b < d / QK; b++) {
        const uint8_t *blk = row + (int64_t)b * 34;
        uint16_t h; memcpy(&h, blk, 2);
        const int8_t *q = (const int8_t *)(blk + 2);
        float s = a * f16_to_f32(h);
        _Pragma("omp simd")
        for (int j = 0; j < QK; j++) y[b * QK + j] += s * (float)q[j];
    }
}
static inline void axpy_q4(float a, const uint8_t *restrict row, float *restrict y, int d, const uint8_t *pf) {
    if (pf) prefetch_row(pf, ROWB_q4(d));
    for (int b = 0; b < d / QK; b++) {
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
}
static inline void axpy_q41(float a, const uint8_t *restrict row, float *restrict y, int d, const uint8_t *pf) {
    if (pf) prefetch_row(pf, ROWB_q41(d));
    for (int b = 0; b < d / QK; b++) {
        const uint8_t *blk = row + (int64_t)b * 20;
        uint16_t h, hm; memcpy(&h, blk, 2); memcpy(&hm, blk + 2, 2);
        const uint8_t *q = blk + 4;
        float s = a * f16_to_f32(h), m = a * f16_to_f32(hm);
        _Pragma("omp simd")
        for (int j = 0; j < QK / 2; j++) {
            y[b * QK + j] += s * (float)(q[j] & 15) + m;
            y[b * QK + j + 16] += s * (float)(q[j] >> 4) + m;
        }
    }
}
#define DEFINE_AXPY4(F)                                                                           \
    static inline void axpy4_##F(const float *a, const uint8_t *const *rows, float *restrict y, int d, \
                                 const uint8_t *const *pf) {                                     \
        for (int r = 0; r < 4; r++) axpy_##F(a[r], rows[r], y, d, pf[r]);                         \
    }
DEFINE_AXPY4(q8)
DEFINE_AXPY4(q4)
DEFINE_AXPY4(q41)
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
/* One row, or four at once (the bulk): both SIMD variants above define axpyn_F. */
#define DEFINE_AXPY_CALLS(F)                                                                      \
    static inline void axpy_##F(float a, const uint8_t *row, float *restrict y, int d,            \
                                const uint8_t *pf) {                                             \
        axpyn_##F(1, &a, &row, y, d, &pf);                                                        \
    }                                                                                             \
    static inline void axpy4_##F(const float *a, const uint8_t *const *rows, float *restrict y,   \
                                 int d, const uint8_t *const *pf) {                              \
        axpyn_##F(4, a, rows, y, d, pf);                                                          \
    }
DEFINE_AXPY_CALLS(q8)
DEFINE_AXPY_CALLS(q4)
DEFINE_AXPY_CALLS(q41)
#endif
#ifndef GROUP_ROWS
#define GROUP_ROWS 16
#endif
/* y += sum_r a[r] * row_r for up to GROUP_ROWS rows: the integer kernel above where there is
 * one, else four rows at a time in fp32. */
#define DEFINE_AXPYG_FP32(F)                                                                      \
    static inline void axpyg_##F(int nr, const float *a, const uint8_t *const *rows, float *restrict y, \
                                 int d, const uint8_t *const *pf) {                              \
        int r = 0;                                                                                \
        for (; r + 4 <= nr; r += 4) axpy4_##F(a + r, rows + r, y, d, pf + r);                     \
        for (; r < nr; r++) axpy_##F(a[r], rows[r], y, d, pf[r]);                                 \
    }
DEFINE_AXPYG_FP32(q8)
#ifndef HAVE_AXPYG_4BIT
DEFINE_AXPYG_FP32(q4)
DEFINE_AXPYG_FP32(q41)
#endif
