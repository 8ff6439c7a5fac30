/* Prompt GEMM over 16-row tiles repacked on the fly (es_prompt_gemm_q4 / _q41 / _q8 from
 * TILE_MIN_TOKENS tokens on; part of quant_rows.h, after quant_gemm.h).
 *
 * Why: the four-row dots (idot4t_*) spend a convert, a permute and an FMA on every vpdpbusd,
 * because each int32 lane there holds four products of one block of one row: the FP ports,
 * not the dots, bound a prompt (~300 int8 GOPS on 2 cores).  Here a tile of 16 rows is
 * transposed once into lane order (int32 lane i = row i's next four weights), so a block of
 * 32 weights of all 16 rows is 8 vpdpbusd against the token's four bytes broadcast, and one
 * convert and one FMA per block finish the 16 rows: a sixth of the FP work per product.
 * The repack reads each tile once per call and is shared by every token.
 *
 * The block sums are the same exact integers; the fp32 sum over blocks runs in another order
 * than the one-token dot's, so a prompt's logits differ from the decode path's in the last
 * bits.  Decode batches (es_gemm, any size) keep the bit-exact idot4t.  From 8 tokens on it
 * wins for 4-bit rows (a 5632 x 2048 q4_0 matrix on 2 cores: 68 vs 86 us a token at 8, 33 vs
 * 89 at 64; at 4 it loses, 99 vs 87), from 32 for q8_0 (twice the bytes to repack). */
#define TILE_ROWS 16
#define TILE_MIN_TOKENS 8
#define TILE_TOKENS 16   /* tokens per pass: 16 accumulators + 8 weight registers */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__F16C__)
#define HAVE_GEMM_TILES 1
/* per block: the weights in lane order (4-bit: 4 x 64 bytes of nibble bytes; q8_0: 8 x 64 bytes
 * made unsigned, w + 128), then 16 fp32 scales, then 16 fp32 minimums (q4_1) */
#define TILE_WBYTES(nib) ((nib) ? 256 : 512)
#define TILE_BLOCK_BYTES(nib, has_min) (TILE_WBYTES(nib) + 64 + ((has_min) ? 64 : 0))

/* 16 rows' 16 bytes at src[i] -> out[j] (j = 0..3): lane i = row i's bytes 4j..4j+3.  Four rows
 * per register, a dword transpose inside each register (vpermd), then a 4 x 4 transpose of the
 * 128-bit lanes across the four registers. */
static inline void transpose16x4(const uint8_t *const *src, int64_t off, int flip, __m512i *out) {
    const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    __m512i z[4];
    for (int q = 0; q < 4; q++) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(src[4 * q] + off)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(src[4 * q + 1] + off)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(src[4 * q + 2] + off)), 2);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(src[4 * q + 3] + off)), 3);
        z[q] = _mm512_permutexvar_epi32(idx, v);   /* 128-bit lane j: dword j of the four rows */
    }
    const __m512i a = _mm512_shuffle_i32x4(z[0], z[1], 0x44), b = _mm512_shuffle_i32x4(z[0], z[1], 0xEE);
    const __m512i c = _mm512_shuffle_i32x4(z[2], z[3], 0x44), d = _mm512_shuffle_i32x4(z[2], z[3], 0xEE);
    out[0] = _mm512_shuffle_i32x4(a, c, 0x88);
    out[1] = _mm512_shuffle_i32x4(a, c, 0xDD);
    out[2] = _mm512_shuffle_i32x4(b, d, 0x88);
    out[3] = _mm512_shuffle_i32x4(b, d, 0xDD);
    if (flip)   /* q8_0: int8 weights made unsigned, w + 128 */
        for (int j = 0; j < 4; j++) out[j] = _mm512_xor_si512(out[j], _mm512_set1_epi8((char)0x80));
}

static void tile_repack(const uint8_t *w, int64_t row_bytes, int64_t i0, int nb, int bb, int qo, int nib,
                        int has_min, int prefetch_next, uint8_t *buf) {
    const int64_t stride = TILE_BLOCK_BYTES(nib, has_min), wb = TILE_WBYTES(nib);
    if (prefetch_next)   /* the next tile streams in from memory while this one is computed */
        for (int64_t o = 0; o < TILE_ROWS * row_bytes; o += 64) PREFETCH(w + (i0 + TILE_ROWS) * row_bytes + o);
    const uint8_t *rows[TILE_ROWS];
    for (int i = 0; i < TILE_ROWS; i++) rows[i] = w + (i0 + i) * row_bytes;
    for (int b = 0; b < nb; b++) {
        const int64_t o = (int64_t)b * bb;
        uint8_t *dst = buf + b * stride;
        __m512i t[4];
        for (int half = 0; half < (nib ? 1 : 2); half++) {   /* q8_0: 32 quant bytes, two halves */
            transpose16x4(rows, o + qo + 16 * half, !nib, t);
            for (int j = 0; j < 4; j++) _mm512_store_si512(dst + (4 * half + j) * 64, t[j]);
        }
        uint16_t h[TILE_ROWS], m[TILE_ROWS];
        for (int i = 0; i < TILE_ROWS; i++) {
            memcpy(h + i, rows[i] + o, 2);
            if (has_min) memcpy(m + i, rows[i] + o + 2, 2);
        }
        _mm512_store_ps((float *)(dst + wb), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h)));
        if (has_min) _mm512_store_ps((float *)(dst + wb + 64), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)m)));
    }
}

/* out[t * ld + i] (16 rows, T <= TILE_TOKENS tokens) = tile . x_t (+ bias) */
static inline __attribute__((always_inline)) void tile_tokens_body(const uint8_t *buf, int nb, int nib, int has_min,
                                                                   const QX *qx, const int T, float *out,
                                                                   int64_t ld, const float *bias) {
    const int64_t stride = TILE_BLOCK_BYTES(nib, has_min), wb = TILE_WBYTES(nib);
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    __m512 acc[TILE_TOKENS];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *src = buf + b * stride;
        __m512i wq[8];   /* wq[j]: every row's weights 4j..4j+3 of the block, unsigned */
        for (int j = 0; j < 4; j++) {
            const __m512i raw = _mm512_load_si512(src + j * 64);
            if (nib) {   /* a nibble byte holds weight j (low) and weight j + 16 (high) */
                wq[j] = _mm512_and_si512(raw, lo4);
                wq[4 + j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), lo4);
            } else {
                wq[j] = raw;
                wq[4 + j] = _mm512_load_si512(src + (4 + j) * 64);
            }
        }
        const __m512 ws = _mm512_load_ps((const float *)(src + wb));
        for (int t = 0; t < T; t++) {
            const QX *x = qx + t;
            const int32_t *xq = (const int32_t *)(x->q + (int64_t)b * QK);
            /* unsigned weights are q + 8 (q4_0) or q + 128 (q8_0): start from -8 or -128 times
             * the block's sum of x (exact); q4_1's minimum is added in fp32 below */
            __m512i s = has_min ? _mm512_setzero_si512() : _mm512_set1_epi32(nib ? x->boff[b] : 16 * x->boff[b]);
            for (int j = 0; j < 8; j++) s = _mm512_dpbusd_epi32(s, wq[j], _mm512_set1_epi32(xq[j]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(ws, _mm512_set1_ps(x->s[b])), acc[t]);
            if (has_min)   /* q4_1: + m * s_x * sum(q) */
                acc[t] = _mm512_fmadd_ps(_mm512_load_ps((const float *)(src + wb + 64)),
                                         _mm512_set1_ps(0.125f * x->sum8[b]), acc[t]);
        }
    }
    const __m512 bv = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int t = 0; t < T; t++) _mm512_storeu_ps(out + t * ld, _mm512_add_ps(acc[t], bv));
}

static void tile_tokens(const uint8_t *buf, int nb, int nib, int has_min, const QX *qx, int T, float *out, int64_t ld,
                        const float *bias) {
    switch (T) {   /* a constant count per instance keeps the accumulators in registers */
    case 16: tile_tokens_body(buf, nb, nib, has_min, qx, 16, out, ld, bias); break;
    case 15: tile_tokens_body(buf, nb, nib, has_min, qx, 15, out, ld, bias); break;
    case 14: tile_tokens_body(buf, nb, nib, has_min, qx, 14, out, ld, bias); break;
    case 13: tile_tokens_body(buf, nb, nib, has_min, qx, 13, out, ld, bias); break;
    case 12: tile_tokens_body(buf, nb, nib, has_min, qx, 12, out, ld, bias); break;
    case 11: tile_tokens_body(buf, nb, nib, has_min, qx, 11, out, ld, bias); break;
    case 10: tile_tokens_body(buf, nb, nib, has_min, qx, 10, out, ld, bias); break;
    case 9: tile_tokens_body(buf, nb, nib, has_min, qx, 9, out, ld, bias); break;
    case 8: tile_tokens_body(buf, nb, nib, has_min, qx, 8, out, ld, bias); break;
    case 7: tile_tokens_body(buf, nb, nib, has_min, qx, 7, out, ld, bias); break;
    case 6: tile_tokens_body(buf, nb, nib, has_min, qx, 6, out, ld, bias); break;
    case 5: tile_tokens_body(buf, nb, nib, has_min, qx, 5, out, ld, bias); break;
    case 4: tile_tokens_body(buf, nb, nib, has_min, qx, 4, out, ld, bias); break;
    case 3: tile_tokens_body(buf, nb, nib, has_min, qx, 3, out, ld, bias); break;
    case 2: tile_tokens_body(buf, nb, nib, has_min, qx, 2, out, ld, bias); break;
    default: tile_tokens_body(buf, nb, nib, has_min, qx, 1, out, ld, bias); break;
    }
}

/* Rows lo.. of a thread's range in whole tiles, all T tokens; returns the first row left. */
static int64_t gemm_tiles(const uint8_t *w, int64_t row_bytes, int bb, int qo, int nib, int has_min, const QX *qx, int d,
                          int T, int64_t lo, int64_t hi, const float *bias, int64_t n, float *out) {
    const int nb = d / QK;
    const int64_t end = lo + (hi - lo) / TILE_ROWS * TILE_ROWS;
    if (end == lo) return lo;
    uint8_t *buf = (uint8_t *)aligned_alloc(64, (size_t)nb * TILE_BLOCK_BYTES(nib, has_min));
    for (int64_t i0 = lo; i0 < end; i0 += TILE_ROWS) {
        tile_repack(w, row_bytes, i0, nb, bb, qo, nib, has_min, i0 + 2 * TILE_ROWS <= end, buf);
        for (int t0 = 0; t0 < T; t0 += TILE_TOKENS)
            tile_tokens(buf, nb, nib, has_min, qx + t0, T - t0 < TILE_TOKENS ? T - t0 : TILE_TOKENS, out + t0 * n + i0,
                        n, bias ? bias + i0 : NULL);
    }
    free(buf);
    return end;
}
#endif
