/* Self-check of the native kernels for a build that Python cannot load: the aarch64
 * cross builds run under qemu-user (tests/backends/test_cpu_arm.py), and the same driver
 * runs natively on x86, so both architectures meet the same checks.
 *
 * Blocks are random bytes with random positive fp16 scales (and q4_1 minima), so every bit
 * pattern of the quants is exercised; the reference de-quantises those bytes here, in double.
 * Checked, per format, on odd shapes and 1 and 2 threads: the GEMV (integer dots: the
 * activation's int8 rounding, bound 2e-2 of the result's scale, as tests/backends/test_cpu_quant.py)
 * with its four-row dots on odd row counts, row sums over all, some and no rows, the prefill
 * GEMM (bit for bit the GEMV per token), the rows GEMM, Top-K, gate/up and the ReGLU FFN (exact,
 * and with fp32 and int8 predictors); the bf16 and fp32 weights' GEMV, row sums, Top-K and
 * exact ReGLU FFN; the fp32 RMSNorm and single-token attention (RoPE, the cache write, GQA).
 * And the whole-layer step against those kernels called one by one.  Prints one line per
 * failure and "ok" at the end. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode_layer.h"

#define DECL(F)                                                                                   \
    void es_gemv_##F(const uint8_t *, const float *, const float *, int, int, int, float *);     \
    void es_weighted_rows_##F(const uint8_t *, const int64_t *, const float *, int, int, int, float *); \
    void es_gemm_##F(const uint8_t *, const float *, const float *, int, int, int, int, float *); \
    void es_rows_gemm_##F(const uint8_t *, const float *, int, int, int, int, float *);          \
    void es_topk_linear_##F(const uint8_t *, const float *, int, int, int, int, float *);        \
    void es_gate_up_##F(const uint8_t *, const uint8_t *, const float *, int, int, int, int, float *); \
    void es_reglu_ffn_##F##_##F(const float *, const float *, const float *, const int8_t *, const float *, \
                                const int8_t *, const float *, const float *, const uint8_t *, const uint8_t *, \
                                const uint8_t *, int, int, int, int, float *, int64_t *);
DECL(q8)
DECL(q4)
DECL(q41)
void es_rms_norm_f32(const float *, const float *, float, int, float *);
#define DECL_FLOAT(S, WT)                                                                         \
    void es_gemv_##S(const WT *, const WT *, const WT *, int, int, int, WT *);                   \
    void es_weighted_rows_##S(const WT *, const int64_t *, const WT *, int, int, int, WT *);     \
    void es_topk_linear_##S(const WT *, const WT *, int, int, int, int, WT *);                   \
    void es_reglu_ffn_##S(const WT *, const WT *, const WT *, const int8_t *, const float *, const int8_t *, \
                          const float *, const WT *, const WT *, const WT *, const WT *, int, int, int, int, \
                          WT *, int64_t *);
DECL_FLOAT(bf16, uint16_t)
DECL_FLOAT(f32, float)
void es_decode_attention_f32(const float *, const float *, const float *, float *, float *, int, int, int, int,
                             int, int, int, float *);

static uint32_t rng = 12345u;
static uint32_t next(void) { rng = rng * 1664525u + 1013904223u; return rng >> 8; }
static float uniform(void) { return (float)next() / 16777216.0f * 2.f - 1.f; }

static double half(uint16_t h) {   /* the normal positive halves made below */
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    return ldexp(1.0 + m / 1024.0, e - 15) * ((h & 0x8000) ? -1 : 1);
}
static uint16_t rand_half(void) { return (uint16_t)(0x2000 + next() % 0x400); }   /* [2^-7, 2^-6) */

enum { Q8, Q4, Q41 };
static const int BB[] = {34, 18, 20};

/* row r of w [n, d] de-quantised into out[d] */
static void dequant(int fmt, const uint8_t *w, int r, int d, double *out) {
    const uint8_t *row = w + (size_t)r * (d / 32) * BB[fmt];
    for (int b = 0; b < d / 32; b++) {
        const uint8_t *blk = row + b * BB[fmt];
        uint16_t h, hm; memcpy(&h, blk, 2); memcpy(&hm, blk + 2, 2);
        double s = half(h);
        for (int j = 0; j < 32; j++) {
            double v;
            if (fmt == Q8) v = s * (int8_t)blk[2 + j];
            else {
                const uint8_t *q = blk + (fmt == Q4 ? 2 : 4);
                int n = j < 16 ? q[j] & 15 : q[j - 16] >> 4;
                v = fmt == Q4 ? s * (n - 8) : s * n + half(hm);
            }
            out[b * 32 + j] = v;
        }
    }
}

static uint8_t *random_rows(int fmt, int n, int d) {
    size_t bytes = (size_t)n * (d / 32) * BB[fmt];
    uint8_t *w = malloc(bytes);
    for (size_t i = 0; i < bytes; i++) w[i] = (uint8_t)next();
    for (size_t o = 0; o < bytes; o += BB[fmt]) {
        uint16_t h = rand_half();
        memcpy(w + o, &h, 2);
        if (fmt == Q41) { uint16_t m = rand_half() | 0x8000; memcpy(w + o + 2, &m, 2); }   /* negative minimum */
    }
    return w;
}

static void gemv(int fmt, const uint8_t *w, const float *x, int n, int d, int nt, float *out) {
    if (fmt == Q8) es_gemv_q8(w, x, NULL, n, d, nt, out);
    else if (fmt == Q4) es_gemv_q4(w, x, NULL, n, d, nt, out);
    else es_gemv_q41(w, x, NULL, n, d, nt, out);
}
static void rows(int fmt, const uint8_t *w, const int64_t *idx, const float *c, int n, int d, int nt, float *out) {
    if (fmt == Q8) es_weighted_rows_q8(w, idx, c, n, d, nt, out);
    else if (fmt == Q4) es_weighted_rows_q4(w, idx, c, n, d, nt, out);
    else es_weighted_rows_q41(w, idx, c, n, d, nt, out);
}

/* the kernel of one name for a format (the driver's own dispatch, as native.py's) */
#define PICK(fmt, name) ((fmt) == Q8 ? name##_q8 : (fmt) == Q4 ? name##_q4 : name##_q41)
#define PICK_FFN(fmt) ((fmt) == Q8 ? es_reglu_ffn_q8_q8 : (fmt) == Q4 ? es_reglu_ffn_q4_q4 : es_reglu_ffn_q41_q41)

static int fails = 0;
static void check(const char *what, int fmt, int n, int d, const float *got, const double *want, int len, double tol) {
    double scale = 1.0, err = 0.0;
    for (int i = 0; i < len; i++) scale = fmax(scale, fabs(want[i]));
    for (int i = 0; i < len; i++) err = fmax(err, fabs(got[i] - want[i]));
    if (!(err <= tol * scale)) {
        printf("FAIL %s fmt=%d n=%d d=%d: max error %g > %g x %g\n", what, fmt, n, d, err, tol, scale);
        fails++;
    }
}

static double dotd(const double *w, const float *x, int d) {
    double s = 0;
    for (int j = 0; j < d; j++) s += w[j] * x[j];
    return s;
}

/* prefill GEMM (equal to the GEMV per token, bit for bit), rows GEMM, Top-K, gate/up and the
 * exact-mode ReGLU FFN, on one shape per format */
static void check_more(int fmt, int n, int d, int nt) {
    const int T = 3;
    uint8_t *w = random_rows(fmt, n, d), *g = random_rows(fmt, n, d), *u = random_rows(fmt, n, d);
    uint8_t *dn = random_rows(fmt, n, d);   /* neuron-major down: [n neurons, d] */
    double *W = malloc(sizeof(double) * (size_t)n * d), *G = malloc(sizeof(double) * (size_t)n * d);
    double *U = malloc(sizeof(double) * (size_t)n * d), *D = malloc(sizeof(double) * (size_t)n * d);
    for (int r = 0; r < n; r++) {
        dequant(fmt, w, r, d, W + (size_t)r * d); dequant(fmt, g, r, d, G + (size_t)r * d);
        dequant(fmt, u, r, d, U + (size_t)r * d); dequant(fmt, dn, r, d, D + (size_t)r * d);
    }
    int big = n > d ? n : d;
    float *x = malloc(sizeof(float) * (size_t)T * big), *got = malloc(sizeof(float) * (size_t)T * big);
    float *one = malloc(sizeof(float) * big);
    double *want = malloc(sizeof(double) * (size_t)T * big);
    for (int i = 0; i < T * big; i++) x[i] = uniform();
    /* GEMM over T tokens x [T, d] */
    PICK(fmt, es_gemm)(w, x, NULL, n, d, T, nt, got);
    for (int t = 0; t < T; t++) {
        PICK(fmt, es_gemv)(w, x + t * d, NULL, n, d, nt, one);
        if (memcmp(one, got + t * n, sizeof(float) * n)) { printf("FAIL gemm != gemv fmt=%d t=%d\n", fmt, t); fails++; }
        for (int r = 0; r < n; r++) want[t * n + r] = dotd(W + (size_t)r * d, x + t * d, d);
    }
    check("gemm", fmt, n, d, got, want, T * n, 2e-2);
    /* rows GEMM: x [T, n] @ w [n, d] */
    PICK(fmt, es_rows_gemm)(w, x, n, d, T, nt, got);
    for (int t = 0; t < T; t++)
        for (int j = 0; j < d; j++) {
            want[t * d + j] = 0;
            for (int r = 0; r < n; r++) want[t * d + j] += x[t * n + r] * W[(size_t)r * d + j];
        }
    check("rows gemm", fmt, n, d, got, want, T * d, 2e-2);
    /* Top-K of x [n] over w_t [n, d]: the k largest |x| (random floats: no ties) */
    int k = n / 2 > 0 ? n / 2 : 1;
    PICK(fmt, es_topk_linear)(w, x, n, d, k, nt, got);
    for (int j = 0; j < d; j++) want[j] = 0;
    for (int r = 0; r < n; r++) {
        int above = 0;
        for (int q = 0; q < n; q++) above += fabsf(x[q]) > fabsf(x[r]);
        if (above < k)
            for (int j = 0; j < d; j++) want[j] += x[r] * W[(size_t)r * d + j];
    }
    check("topk linear", fmt, n, d, got, want, d, 2e-2);
    /* gate/up with ReLU, then the exact ReGLU FFN (relu(gate) * up over the neurons, down rows) */
    PICK(fmt, es_gate_up)(g, u, x, n, d, 1, nt, got);
    double *h = malloc(sizeof(double) * n);
    for (int r = 0; r < n; r++) {
        double gv = dotd(G + (size_t)r * d, x, d);
        h[r] = (gv > 0 ? gv : 0) * dotd(U + (size_t)r * d, x, d);
    }
    check("gate/up", fmt, n, d, got, h, n, 3e-2);
    int64_t counts[2];
    PICK_FFN(fmt)(x, NULL, NULL, NULL, NULL, NULL, NULL, NULL, g, u, dn, d, 0, n, nt, got, counts);
    for (int j = 0; j < d; j++) {
        want[j] = 0;
        for (int r = 0; r < n; r++) want[j] += h[r] * D[(size_t)r * d + j];
    }
    /* the FFN compounds three int8-rounded products (gate, up, down): a looser bound, still far
     * below what a wrong nibble, lane or row gives (tens of percent) */
    const double ffn_tol = 6e-2;
    check("reglu ffn (exact)", fmt, n, d, got, want, d, ffn_tol);
    if (counts[0] != n) { printf("FAIL reglu ffn candidates %lld != %d\n", (long long)counts[0], n); fails++; }
    /* predictor mode, fp32 and int8 factors (r = 32): a bias of +-1e4 admits exactly the even
     * neurons whatever the scores, so the candidates and the result are known */
    const int r = 32;
    float *a_t = malloc(sizeof(float) * r * d), *b_t = malloc(sizeof(float) * n * r), *bias = malloc(sizeof(float) * n);
    int8_t *qa = malloc((size_t)r * d), *qb = malloc((size_t)n * r);
    float *sa = malloc(sizeof(float) * r), *sb = malloc(sizeof(float) * n);
    for (int i = 0; i < r * d; i++) { a_t[i] = uniform(); qa[i] = (int8_t)(next() % 255 - 127); }
    for (int i = 0; i < n * r; i++) { b_t[i] = uniform(); qb[i] = (int8_t)(next() % 255 - 127); }
    for (int i = 0; i < r; i++) sa[i] = 0.01f;
    for (int i = 0; i < n; i++) { sb[i] = 0.01f; bias[i] = i % 2 == 0 ? 1e4f : -1e4f; }
    for (int j = 0; j < d; j++) {
        want[j] = 0;
        for (int q = 0; q < n; q += 2) want[j] += h[q] * D[(size_t)q * d + j];
    }
    for (int packed = 0; packed < 2; packed++) {
        PICK_FFN(fmt)(x, a_t, b_t, packed ? qa : NULL, sa, packed ? qb : NULL, sb, bias, g, u, dn, d, r, n, nt, got, counts);
        check(packed ? "reglu ffn (int8 predictor)" : "reglu ffn (fp32 predictor)", fmt, n, d, got, want, d, ffn_tol);
        if (counts[0] != (n + 1) / 2) { printf("FAIL predictor candidates %lld\n", (long long)counts[0]); fails++; }
    }
    free(a_t); free(b_t); free(bias); free(qa); free(qb); free(sa); free(sb);
    free(w); free(g); free(u); free(dn); free(W); free(G); free(U); free(D); free(x); free(got); free(one);
    free(want); free(h);
}

static void check_rms_norm(void) {
    const int n = 100;
    float x[100], wt[100], got[100];
    double want[100], ss = 0;
    for (int i = 0; i < n; i++) { x[i] = uniform() * 3; wt[i] = uniform(); ss += (double)x[i] * x[i]; }
    es_rms_norm_f32(x, wt, 1e-5f, n, got);
    for (int i = 0; i < n; i++) want[i] = wt[i] * (x[i] / sqrt(ss / n + 1e-5));
    check("rms norm", 0, n, 1, got, want, n, 1e-5);
}

/* one new token at `slot` attending over first..slot: RoPE (rotate-half), GQA, softmax */
static void check_attention(int nt) {
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
    es_decode_attention_f32(qkv, cs, sn, ck, cv, H, KV, HD, L, slot, first, nt, got);
    double kerr = 0;
    for (int g = 0; g < KV; g++)
        for (int i = 0; i < HD; i++) {
            kerr = fmax(kerr, fabs(ck[(g * L + slot) * HD + i] - k[g * HD + i]));
            kerr = fmax(kerr, fabs(cv[(g * L + slot) * HD + i] - qkv[nq + KV * HD + g * HD + i]));
        }
    if (kerr > 1e-5) { printf("FAIL attention cache write: %g\n", kerr); fails++; }
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
    check("attention", 0, H, HD, got, want, nq, 1e-5);
}

/* bf16 / fp32 weights (the float kernels of sparse_rows.c): GEMV, row sums, Top-K and the
 * exact ReGLU FFN; values in and out in the weights' dtype */
static uint16_t to_bf16(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (uint16_t)(u >> 16); }
static float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
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
            for (int q = 0; q < n; q++) above += fabsf(FROM(x[q])) > fabsf(FROM(x[r]));           \
            if (above < k)                                                                        \
                for (int j = 0; j < d; j++) want[j] += (double)FROM(x[r]) * FROM(w[(size_t)r * d + j]); \
        }                                                                                         \
        for (int j = 0; j < d; j++) got[j] = FROM(out[j]);                                        \
        check("topk linear " #S, 0, n, d, got, want, d, TOL);                                     \
        int64_t counts[2];   /* exact ReGLU: gate and up rows [n, d] against x [d], down_t = w */ \
        es_reglu_ffn_##S(x, NULL, NULL, NULL, NULL, NULL, NULL, NULL, g, u, w, d, 0, n, nt, out, counts); \
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
        free(w); free(g); free(u); free(x); free(out); free(got); free(want); free(h);           \
    }
#define SAME(v) (v)
DEFINE_CHECK_FLOAT(bf16, uint16_t, to_bf16, from_bf16, 1e-2)
DEFINE_CHECK_FLOAT(f32, float, SAME, SAME, 1e-4)

/* the whole-layer step against the same kernels called one by one, in the order and with the
 * roundings decode_layer.c documents (fp32 activations: bit for bit); q4_0 weights, dense or
 * Top-K qkv, SiLU FFN with a neuron-major or a row-major down projection */
static void check_layer(int nt, int topk, int down_rows) {
    enum { D = 64, H = 4, KV = 2, HD = 16, F = 96, L = 8, NQKV = H * HD + 2 * KV * HD };
    const int slot = 4, first = 0, k = 40;
    uint8_t *wqkv = topk ? random_rows(Q4, D, NQKV) : random_rows(Q4, NQKV, D), *wo = random_rows(Q4, D, H * HD);
    uint8_t *g = random_rows(Q4, F, D), *u = random_rows(Q4, F, D);
    uint8_t *dn = down_rows ? random_rows(Q4, D, F) : random_rows(Q4, F, D);
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
    desc.ffn = FFN_SILU; desc.gate_fmt = desc.down_fmt = FMT_Q4; desc.d_ff = F; desc.down_rows = down_rows;
    desc.gate = g; desc.up = u; desc.down_t = dn;
    memcpy(xl, x, sizeof x);
    int64_t counts[2];
    es_decode_layer(&desc, xl, ck1, cv1, cs, sn, slot, first, nt, counts);
    es_rms_norm_f32(x, an, 1e-5f, D, h);
    if (topk) es_topk_linear_q4(wqkv, h, D, NQKV, k, nt, qkv);
    else es_gemv_q4(wqkv, h, NULL, NQKV, D, nt, qkv);
    es_decode_attention_f32(qkv, cs, sn, ck2, cv2, H, KV, HD, L, slot, first, nt, att);
    es_gemv_q4(wo, att, NULL, D, H * HD, nt, y);
    for (int i = 0; i < D; i++) x[i] += y[i];
    es_rms_norm_f32(x, mn, 1e-5f, D, h);
    es_ffn_dense_q(FMT_Q4, FMT_Q4, 0, down_rows, g, u, dn, D, F, h, nt, y);
    for (int i = 0; i < D; i++) x[i] += y[i];
    if (memcmp(x, xl, sizeof x) || memcmp(ck1, ck2, sizeof ck1) || memcmp(cv1, cv2, sizeof cv1)) {
        printf("FAIL decode layer != its kernels (topk=%d down_rows=%d nt=%d)\n", topk, down_rows, nt);
        fails++;
    }
    free(wqkv); free(wo); free(g); free(u); free(dn);
}

int main(void) {
    for (int nt = 1; nt <= 2; nt++)
        for (int topk = 0; topk < 2; topk++)
            for (int rows_down = 0; rows_down < 2; rows_down++) check_layer(nt, topk, rows_down);
    for (int nt = 1; nt <= 2; nt++) {
        check_float_bf16(37, 96, nt); check_float_bf16(70, 1000, nt);
        check_float_f32(37, 96, nt); check_float_f32(70, 1000, nt);
    }
    check_rms_norm();
    check_attention(1);
    check_attention(2);
    for (int fmt = Q8; fmt <= Q41; fmt++)
        for (int nt = 1; nt <= 2; nt++) {
            check_more(fmt, 37, 96, nt);
            check_more(fmt, 64, 2560, nt);
        }
    const int shapes[][2] = {{1, 32}, {7, 96}, {37, 256}, {130, 2560}};
    for (int fmt = Q8; fmt <= Q41; fmt++)
        for (int si = 0; si < 4; si++) {
            int n = shapes[si][0], d = shapes[si][1];
            uint8_t *w = random_rows(fmt, n, d);
            double *deq = malloc(sizeof(double) * (size_t)n * d), *want = malloc(sizeof(double) * (size_t)(n > d ? n : d));
            float *x = malloc(sizeof(float) * d), *got = malloc(sizeof(float) * (size_t)(n > d ? n : d));
            for (int r = 0; r < n; r++) dequant(fmt, w, r, d, deq + (size_t)r * d);
            for (int j = 0; j < d; j++) x[j] = uniform();
            for (int nt = 1; nt <= 2; nt++) {
                gemv(fmt, w, x, n, d, nt, got);
                for (int r = 0; r < n; r++) {
                    want[r] = 0;
                    for (int j = 0; j < d; j++) want[r] += deq[(size_t)r * d + j] * x[j];
                }
                check("gemv", fmt, n, d, got, want, n, 2e-2);
                /* row sums: coefficients over all rows, every other row, none */
                float *c = malloc(sizeof(float) * n);
                int64_t *idx = malloc(sizeof(int64_t) * n);
                for (int r = 0; r < n; r++) c[r] = uniform();
                for (int pick = 0; pick < 3; pick++) {
                    int m = 0;
                    for (int r = 0; r < n; r++)
                        if (pick == 0 || (pick == 1 && r % 2 == 1)) idx[m++] = r;
                    for (int j = 0; j < d; j++) {
                        want[j] = 0;
                        for (int k = 0; k < m; k++) want[j] += c[k] * deq[(size_t)idx[k] * d + j];
                    }
                    rows(fmt, w, pick == 0 ? NULL : idx, c, m, d, nt, got);
                    check(pick == 0 ? "row sums (all)" : pick == 1 ? "row sums (some)" : "row sums (none)",
                          fmt, m, d, got, want, d, 2e-2);
                }
                free(c); free(idx);
            }
            free(w); free(deq); free(want); free(x); free(got);
        }
    if (fails) return 1;
    printf("ok\n");
    return 0;
}
