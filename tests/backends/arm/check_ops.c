/* The float-weight kernels, RMSNorm, attention and the whole-layer step, for the ARM check
 * driver (see check_quant.c). */
#include "check.h"

static void check_rms_norm(void) {
    const int n = 100;
    float x[100], wt[100], got[100];
    double want[100];
    double ss = 0;
    for (int i = 0; i < n; i++) { x[i] = uniform() * 3; wt[i] = uniform(); }
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    es_rms_norm_f32(x, wt, 1e-5f, n, got);
    for (int i = 0; i < n; i++) want[i] = wt[i] * (x[i] / sqrt(ss / n + 1e-5));
    check("rms norm", 0, n, 1, got, want, n, 1e-5);
}

/* one new token at `slot` attending over first..slot: RoPE (rotate-half), GQA, softmax */
static void check_attention(int nt, int bf16) {
    const double tol = bf16 ? 2e-2 : 1e-5;   /* bf16: RoPE and the output rounded to 8 bits */
    enum { H = 4, KV = 2, HD = 16, L = 8 };
    const int slot = 5, first = 1, nq = H * HD;
    float qkv[H * HD + 2 * KV * HD], cs[HD], sn[HD], ck[KV * L * HD], cv[KV * L * HD], got[H * HD];
    double want[H * HD], q[H * HD], k[KV * HD];
    for (int i = 0; i < nq + 2 * KV * HD; i++) qkv[i] = uniform();
    for (int i = 0; i < HD; i++) { double t = 0.3 * (i % (HD / 2)) + 0.1; cs[i] = (float)cos(t); sn[i] = (float)sin(t); }
    for (int i = 0; i < KV * L * HD; i++) { ck[i] = uniform(); cv[i] = uniform(); }
    for (int v = 0; v < H + KV; v++) {   /* rotate half: (a, b) -> (a cos - b sin, b cos + a sin) */
        const float *src = qkv + v * HD;
        double *dst = v < H ? q + v * HD : k + (v - H) * HD;
        for (int i = 0; i < HD / 2; i++) {
            double a = src[i], b = src[i + HD / 2];
            dst[i] = a * cs[i] - b * sn[i];
            dst[i + HD / 2] = b * cs[i + HD / 2] + a * sn[i + HD / 2];
        }
    }
    if (bf16) {   /* the inputs rounded to bf16 first, so the reference below sees the same values */
        uint16_t q16[H * HD + 2 * KV * HD], c16[HD], s16[HD], k16[KV * L * HD], v16[KV * L * HD], o16[H * HD];
        for (int i = 0; i < nq + 2 * KV * HD; i++) qkv[i] = from_bf16(q16[i] = to_bf16(qkv[i]));
        for (int i = 0; i < HD; i++) { cs[i] = from_bf16(c16[i] = to_bf16(cs[i])); sn[i] = from_bf16(s16[i] = to_bf16(sn[i])); }
        for (int i = 0; i < KV * L * HD; i++) { ck[i] = from_bf16(k16[i] = to_bf16(ck[i])); cv[i] = from_bf16(v16[i] = to_bf16(cv[i])); }
        es_decode_attention_bf16(q16, c16, s16, k16, v16, H, KV, HD, L, slot, first, nt, o16);
        for (int i = 0; i < nq; i++) got[i] = from_bf16(o16[i]);
        for (int i = 0; i < KV * L * HD; i++) { ck[i] = from_bf16(k16[i]); cv[i] = from_bf16(v16[i]); }
    } else {
        es_decode_attention_f32(qkv, cs, sn, ck, cv, H, KV, HD, L, slot, first, nt, got);
    }
    double kerr = 0;
    for (int g = 0; g < KV; g++)
        for (int i = 0; i < HD; i++) {
            kerr = fmax(kerr, fabs(ck[(g * L + slot) * HD + i] - k[g * HD + i]));
            kerr = fmax(kerr, fabs(cv[(g * L + slot) * HD + i] - qkv[nq + KV * HD + g * HD + i]));
        }
    if (kerr > tol) { printf("FAIL attention cache write (bf16=%d): %g\n", bf16, kerr); fails++; }
    for (int h = 0; h < H; h++) {
        int g = h / (H / KV);
        double sc[L], m = -1e30, sum = 0;
        for (int j = first; j <= slot; j++) {
            sc[j] = 0;
            for (int i = 0; i < HD; i++) sc[j] += q[h * HD + i] * ck[(g * L + j) * HD + i];
            sc[j] /= sqrt((double)HD);
            m = fmax(m, sc[j]);
        }
        for (int j = first; j <= slot; j++) { sc[j] = exp(sc[j] - m); sum += sc[j]; }
        for (int i = 0; i < HD; i++) {
            want[h * HD + i] = 0;
            for (int j = first; j <= slot; j++) want[h * HD + i] += sc[j] / sum * cv[(g * L + j) * HD + i];
        }
    }
    check(bf16 ? "attention bf16" : "attention", 0, H, HD, got, want, nq, tol);
}

/* bf16 / fp32 weights (the float kernels of sparse_rows.c): GEMV, row sums, Top-K and the
 * exact ReGLU FFN; values in and out in the weights' dtype */
#define DEFINE_CHECK_FLOAT(S, WT, TO, FROM, TOL)                                                  \
    static void check_float_##S(int n, int d, int nt) {                                          \
        size_t nd = (size_t)n * d;                                                                \
        WT *w = malloc(sizeof(WT) * nd), *g = malloc(sizeof(WT) * nd), *u = malloc(sizeof(WT) * nd); \
        WT *x = malloc(sizeof(WT) * (n > d ? n : d)), *out = malloc(sizeof(WT) * (n > d ? n : d)); \
        float *got = malloc(sizeof(float) * (n > d ? n : d));                                     \
        double *want = malloc(sizeof(double) * (n > d ? n : d)), *h = malloc(sizeof(double) * n); \
        for (size_t i = 0; i < nd; i++) { w[i] = TO(uniform()); g[i] = TO(uniform()); u[i] = TO(uniform()); } \
        for (int i = 0; i < (n > d ? n : d); i++) x[i] = TO(uniform());                           \
        es_gemv_##S(w, x, NULL, n, d, nt, out);                                                   \
        for (int r = 0; r < n; r++) {                                                             \
            want[r] = 0;                                                                          \
            for (int j = 0; j < d; j++) want[r] += (double)FROM(w[(size_t)r * d + j]) * FROM(x[j]); \
            got[r] = FROM(out[r]);                                                                \
        }                                                                                         \
        check("gemv " #S, 0, n, d, got, want, n, TOL);                                            \
        es_weighted_rows_##S(w, NULL, x, n, d, nt, out);   /* x[0..n) as the coefficients */      \
        for (int j = 0; j < d; j++) {                                                             \
            want[j] = 0;                                                                          \
            for (int r = 0; r < n; r++) want[j] += (double)FROM(x[r]) * FROM(w[(size_t)r * d + j]); \
            got[j] = FROM(out[j]);                                                                \
        }                                                                                         \
        check("row sums " #S, 0, n, d, got, want, d, TOL);                                        \
        int k = n / 2 > 0 ? n / 2 : 1;                                                            \
        es_topk_linear_##S(w, x, n, d, k, nt, out);                                               \
        for (int j = 0; j < d; j++) want[j] = 0;                                                  \
        for (int r = 0; r < n; r++) {                                                             \
            int above = 0;                                                                        \
            for (int q = 0; q < n; q++) {   /* ties (common in bf16) go to the lower index */     \
                float a = fabsf(FROM(x[q])), b = fabsf(FROM(x[r]));                               \
                above += a > b || (a == b && q < r);                                              \
            }                                                                                     \
            if (above < k)                                                                        \
                for (int j = 0; j < d; j++) want[j] += (double)FROM(x[r]) * FROM(w[(size_t)r * d + j]); \
        }                                                                                         \
        for (int j = 0; j < d; j++) got[j] = FROM(out[j]);                                        \
        check("topk linear " #S, 0, n, d, got, want, d, TOL);                                     \
        int64_t counts[2];   /* exact ReGLU: gate and up rows [n, d] against x [d], down_t = w */ \
        es_reglu_ffn_##S(x, NULL, NULL, NULL, NULL, NULL, NULL, NULL, g, u, w, d, 0, n, nt, 0.f, out, counts); \
        for (int r = 0; r < n; r++) {                                                             \
            double gv = 0, uv = 0;                                                                \
            for (int j = 0; j < d; j++) {                                                         \
                gv += (double)FROM(g[(size_t)r * d + j]) * FROM(x[j]);                            \
                uv += (double)FROM(u[(size_t)r * d + j]) * FROM(x[j]);                            \
            }                                                                                     \
            h[r] = (gv > 0 ? gv : 0) * uv;                                                        \
        }                                                                                         \
        for (int j = 0; j < d; j++) {                                                             \
            want[j] = 0;                                                                          \
            for (int r = 0; r < n; r++) want[j] += h[r] * FROM(w[(size_t)r * d + j]);             \
            got[j] = FROM(out[j]);                                                                \
        }                                                                                         \
        check("reglu ffn " #S, 0, n, d, got, want, d, 3 * TOL);                                   \
        /* predictor mode (r = 32, bias +-1e4: exactly the even neurons) */                      \
        WT *pa = malloc(sizeof(WT) * 32 * d), *pb = malloc(sizeof(WT) * n * 32), *pbias = malloc(sizeof(WT) * n); \
        for (int i = 0; i < 32 * d; i++) pa[i] = TO(uniform());                                   \
        for (int i = 0; i < n * 32; i++) pb[i] = TO(uniform());                                   \
        for (int i = 0; i < n; i++) pbias[i] = TO(i % 2 ? -1e4f : 1e4f);                          \
        es_reglu_ffn_##S(x, pa, pb, NULL, NULL, NULL, NULL, pbias, g, u, w, d, 32, n, nt, 0.f, out, counts); \
        for (int j = 0; j < d; j++) {                                                             \
            want[j] = 0;                                                                          \
            for (int r = 0; r < n; r += 2) want[j] += h[r] * FROM(w[(size_t)r * d + j]);          \
            got[j] = FROM(out[j]);                                                                \
        }                                                                                         \
        check("reglu ffn predictor " #S, 0, n, d, got, want, d, 3 * TOL);                         \
        if (counts[0] != (n + 1) / 2) { printf("FAIL predictor candidates " #S "\n"); fails++; }  \
        free(pa); free(pb); free(pbias);                                                          \
        free(w); free(g); free(u); free(x); free(out); free(got); free(want); free(h);           \
    }
#define SAME(v) (v)
DEFINE_CHECK_FLOAT(bf16, uint16_t, to_bf16, from_bf16, 1e-2)
DEFINE_CHECK_FLOAT(f32, float, SAME, SAME, 1e-4)

/* the whole-layer step against the same kernels called one by one, in the order and with the
 * roundings decode_layer.c documents (fp32 activations: bit for bit); q4_0 weights, dense or
 * Top-K qkv, a SiLU FFN with a neuron-major or a row-major down projection, the exact or
 * predictor-sparse ReGLU FFN, or (tk) a Top-K SwiGLU with residual adapters after the
 * attention and the FFN */
static void check_layer(int nt, int topk, int down_rows, int sparse, int pred, int tk) {
    enum { D = 64, H = 4, KV = 2, HD = 16, F = 96, L = 8, NQKV = H * HD + 2 * KV * HD };
    const int slot = 4, first = 0, k = 40;
    uint8_t *wqkv = topk ? random_rows(Q4, D, NQKV) : random_rows(Q4, NQKV, D), *wo = random_rows(Q4, D, H * HD);
    uint8_t *g = random_rows(Q4, F, D), *u = random_rows(Q4, F, D);
    uint8_t *dn = down_rows ? random_rows(Q4, D, F) : random_rows(Q4, F, D);
    uint8_t *gu = random_rows(Q4, D, 2 * F), *aa = random_rows(Q4, D, D), *ad = random_rows(Q4, D, D);
    const int k_gu = 45, k_dn = 50;
    float gup[2 * F], hh[F];
    float an[D], mn[D], x[D], xl[D], h[D], y[D], qkv[NQKV], att[H * HD], cs[HD], sn[HD];
    float ck1[KV * L * HD], cv1[KV * L * HD], ck2[KV * L * HD], cv2[KV * L * HD];
    for (int i = 0; i < D; i++) { an[i] = 1 + 0.2f * uniform(); mn[i] = 1 + 0.2f * uniform(); x[i] = uniform(); }
    for (int i = 0; i < HD; i++) { cs[i] = (float)cos(0.2 * i); sn[i] = (float)sin(0.2 * i); }
    for (int i = 0; i < KV * L * HD; i++) { ck1[i] = ck2[i] = uniform(); cv1[i] = cv2[i] = uniform(); }
    ESLayer desc;
    memset(&desc, 0, sizeof desc);
    desc.d = D; desc.n_heads = H; desc.n_kv = KV; desc.hd = HD; desc.max_len = L; desc.eps = 1e-5f;
    desc.attn_norm = an; desc.mlp_norm = mn;
    desc.qkv = (ESLinear){wqkv, NULL, FMT_Q4, topk ? D : NQKV, topk ? NQKV : D, topk ? k : 0};
    desc.o = (ESLinear){wo, NULL, FMT_Q4, D, H * HD, 0};
    desc.ffn = sparse ? FFN_REGLU_SPARSE : FFN_SILU; desc.gate_fmt = desc.down_fmt = FMT_Q4; desc.d_ff = F; desc.down_rows = down_rows;
    desc.gate = g; desc.up = u; desc.down_t = dn;
    float pa[32 * D], pb[F * 32], pbias[F];   /* predictor: bias +-1e4 admits the even neurons */
    for (int i = 0; i < 32 * D; i++) pa[i] = uniform();
    for (int i = 0; i < F * 32; i++) pb[i] = uniform();
    for (int i = 0; i < F; i++) pbias[i] = i % 2 ? -1e4f : 1e4f;
    if (pred) { desc.a_t = pa; desc.b_t = pb; desc.pbias = pbias; desc.rank = 32; }
    if (tk) {
        desc.ffn = FFN_TOPK_SWIGLU;
        desc.gate_up = (ESLinear){gu, NULL, FMT_Q4, D, 2 * F, k_gu};
        desc.down = (ESLinear){dn, NULL, FMT_Q4, F, D, k_dn};
        desc.attn_adapter = (ESLinear){aa, NULL, FMT_Q4, D, D, 0};
        desc.adapter = (ESLinear){ad, NULL, FMT_Q4, D, D, 0};
    }
    float x0[D], ck0[KV * L * HD], cv0[KV * L * HD];
    memcpy(x0, x, sizeof x); memcpy(ck0, ck1, sizeof ck0); memcpy(cv0, cv1, sizeof cv0);
    memcpy(xl, x, sizeof x);
    int64_t counts[2];
    es_decode_layer(&desc, xl, ck1, cv1, cs, sn, slot, first, nt, counts);
    es_rms_norm_f32(x, an, 1e-5f, D, h);
    if (topk) es_topk_linear_q4(wqkv, h, D, NQKV, k, nt, qkv);
    else es_gemv_q4(wqkv, h, NULL, NQKV, D, nt, qkv);
    es_decode_attention_f32(qkv, cs, sn, ck2, cv2, H, KV, HD, L, slot, first, nt, att);
    es_gemv_q4(wo, att, NULL, D, H * HD, nt, y);
    for (int i = 0; i < D; i++) x[i] += y[i];
    if (tk) { es_gemv_q4(aa, x, NULL, D, D, nt, y); memcpy(x, y, sizeof x); }
    es_rms_norm_f32(x, mn, 1e-5f, D, h);
    int64_t c2[2];
    if (tk) {
        es_topk_linear_q4(gu, h, D, 2 * F, k_gu, nt, gup);
        es_swiglu(0, gup, 1, F, hh);
        es_topk_linear_q4(dn, hh, F, D, k_dn, nt, y);
    } else if (sparse) es_reglu_ffn_q4_q4(h, pred ? pa : NULL, pred ? pb : NULL, NULL, NULL, NULL, NULL, pred ? pbias : NULL,
                                   g, u, dn, D, pred ? 32 : 0, F, nt, 0.f, y, c2);
    else es_ffn_dense_q(FMT_Q4, FMT_Q4, 0, down_rows, g, u, dn, D, F, h, nt, y);
    for (int i = 0; i < D; i++) x[i] += y[i];
    if (tk) { es_gemv_q4(ad, x, NULL, D, D, nt, y); memcpy(x, y, sizeof x); }
    if (memcmp(x, xl, sizeof x) || memcmp(ck1, ck2, sizeof ck1) || memcmp(cv1, cv2, sizeof cv1)) {
        printf("FAIL decode layer != its kernels (topk=%d down_rows=%d sparse=%d pred=%d tk=%d nt=%d)\n", topk,
               down_rows, sparse, pred, tk, nt);
        fails++;
    }
    /* two layers in one es_decode_layers call == two es_decode_layer calls */
    float xa[D], xb[D], ka[2][KV * L * HD], va[2][KV * L * HD], kb[2][KV * L * HD], vb[2][KV * L * HD];
    memcpy(xa, x0, sizeof xa); memcpy(xb, x0, sizeof xb);
    for (int l = 0; l < 2; l++) {
        memcpy(ka[l], ck0, sizeof ck0); memcpy(kb[l], ck0, sizeof ck0);
        memcpy(va[l], cv0, sizeof cv0); memcpy(vb[l], cv0, sizeof cv0);
    }
    const ESLayer *two[2] = {&desc, &desc};
    void *kp[2] = {ka[0], ka[1]}, *vp[2] = {va[0], va[1]};
    int64_t c4[4];
    es_decode_layers(two, 2, xa, kp, vp, cs, sn, slot, first, nt, c4);
    for (int l = 0; l < 2; l++) es_decode_layer(&desc, xb, kb[l], vb[l], cs, sn, slot, first, nt, counts);
    if (memcmp(xa, xb, sizeof xa) || memcmp(ka, kb, sizeof ka) || memcmp(va, vb, sizeof va)) {
        printf("FAIL decode layers != layer by layer (topk=%d sparse=%d pred=%d nt=%d)\n", topk, sparse, pred, nt);
        fails++;
    }
    /* bf16 activations, norms, RoPE rows and cache: the same layer within bf16's rounding (a
     * wrong layout or conversion is off by the values themselves).  Dense q/k/v only: with
     * Top-K, bf16's rounding may flip which entries are kept, and the fp32 check above already
     * holds the Top-K path to its kernels bit for bit. */
    if (topk) goto done;
    uint16_t x16[D], an16[D], mn16[D], cs16[HD], sn16[HD], k16[KV * L * HD], v16[KV * L * HD];
    for (int i = 0; i < D; i++) { x16[i] = to_bf16(x0[i]); an16[i] = to_bf16(an[i]); mn16[i] = to_bf16(mn[i]); }
    for (int i = 0; i < HD; i++) { cs16[i] = to_bf16(cs[i]); sn16[i] = to_bf16(sn[i]); }
    for (int i = 0; i < KV * L * HD; i++) { k16[i] = to_bf16(ck0[i]); v16[i] = to_bf16(cv0[i]); }
    ESLayer d16 = desc;
    d16.bf16 = 1; d16.attn_norm = an16; d16.mlp_norm = mn16;
    es_decode_layer(&d16, x16, k16, v16, cs16, sn16, slot, first, nt, counts);
    float got16[D], kgot[KV * HD];
    double want16[D], kwant[KV * HD];
    for (int i = 0; i < D; i++) { got16[i] = from_bf16(x16[i]); want16[i] = xl[i]; }
    for (int h2 = 0; h2 < KV; h2++)   /* the new token's keys, written at slot */
        for (int i = 0; i < HD; i++) {
            kgot[h2 * HD + i] = from_bf16(k16[(h2 * L + slot) * HD + i]);
            kwant[h2 * HD + i] = ck1[(h2 * L + slot) * HD + i];
        }
    check(tk ? "decode layer bf16 (Top-K SwiGLU, adapters)" : "decode layer bf16", Q4, 1, D, got16, want16, D, 6e-2);
    check("decode layer bf16 cache", Q4, 1, KV * HD, kgot, kwant, KV * HD, 3e-2);
done:
    free(wqkv); free(wo); free(g); free(u); free(dn); free(gu); free(aa); free(ad);
}

static void check_rms_norm_bf16(void) {
    const int n = 100;
    uint16_t x[100], wt[100], out[100];
    float got[100];
    double want[100];
    double ss = 0;
    for (int i = 0; i < n; i++) { x[i] = to_bf16(uniform() * 3); wt[i] = to_bf16(uniform()); }
    for (int i = 0; i < n; i++) ss += (double)from_bf16(x[i]) * from_bf16(x[i]);
    es_rms_norm_bf16(x, wt, 1e-5f, n, out);
    for (int i = 0; i < n; i++) { want[i] = from_bf16(wt[i]) * (from_bf16(x[i]) / sqrt(ss / n + 1e-5)); got[i] = from_bf16(out[i]); }
    check("rms norm bf16", 0, n, 1, got, want, n, 1e-2);
}

/* es_act_mul over the GEMVs' gate and up equals es_gate_up's fused activation bit for bit: a
 * batched decode step's dense FFN (gate and up as GEMMs, then es_act_mul) relies on it */
static void check_act_mul(int nt) {
    enum { N = 70, D = 96 };
    uint8_t *g = random_rows(Q4, N, D), *u = random_rows(Q4, N, D);
    float x[D], gv[N], uv[N], h[N], fused[N];
    for (int i = 0; i < D; i++) x[i] = uniform();
    es_gemv_q4(g, x, NULL, N, D, nt, gv);
    es_gemv_q4(u, x, NULL, N, D, nt, uv);
    for (int relu = 0; relu < 2; relu++) {
        es_act_mul(gv, uv, N, relu, h);
        es_gate_up_q4(g, u, x, N, D, relu, nt, fused);
        if (memcmp(h, fused, sizeof h)) { printf("FAIL act_mul != gate_up (relu=%d nt=%d)\n", relu, nt); fails++; }
    }
    free(g); free(u);
}

void check_ops(void) {
    for (int nt = 1; nt <= 2; nt++) check_act_mul(nt);
    for (int nt = 1; nt <= 2; nt++)
        for (int topk = 0; topk < 2; topk++)
            /* dense: neuron-major, row-major down; sparse: exact, predictor; Top-K SwiGLU + adapters */
            for (int ffn = 0; ffn < 5; ffn++)
                check_layer(nt, topk, ffn == 1, ffn == 2 || ffn == 3, ffn == 3, ffn == 4);
    for (int nt = 1; nt <= 2; nt++) {
        check_float_bf16(37, 96, nt); check_float_bf16(70, 1000, nt);
        check_float_f32(37, 96, nt); check_float_f32(70, 1000, nt);
    }
    check_rms_norm();
    for (int nt = 1; nt <= 2; nt++) { check_attention(nt, 0); check_attention(nt, 1); }
    check_rms_norm_bf16();
}
