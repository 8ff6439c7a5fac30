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
#include "check.h"

int fails = 0;
void check(const char *what, int fmt, int n, int d, const float *got, const double *want, int len, double tol) {
    double scale = 1.0, err = 0.0;
    for (int i = 0; i < len; i++) scale = fmax(scale, fabs(want[i]));
    for (int i = 0; i < len; i++) err = fmax(err, fabs(got[i] - want[i]));
    if (!(err <= tol * scale)) {
        printf("FAIL %s fmt=%d n=%d d=%d: max error %g > %g x %g\n", what, fmt, n, d, err, tol, scale);
        fails++;
    }
}

void check_ops(void);   /* check_ops.c */

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
        for (int q = 0; q < n; q++) above += fabsf(x[q]) > fabsf(x[r]) || (fabsf(x[q]) == fabsf(x[r]) && q < r);
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
    PICK_FFN(fmt)(x, NULL, NULL, NULL, NULL, NULL, NULL, NULL, g, u, dn, d, 0, n, nt, 0.f, got, counts);
    for (int j = 0; j < d; j++) {
        want[j] = 0;
        for (int r = 0; r < n; r++) want[j] += h[r] * D[(size_t)r * d + j];
    }
    /* the FFN compounds three int8-rounded products (gate, up, down): a looser bound, still far
     * below what a wrong nibble, lane or row gives (tens of percent) */
    const double ffn_tol = 6e-2;
    check("reglu ffn (exact)", fmt, n, d, got, want, d, ffn_tol);
    if (counts[0] != n) { printf("FAIL reglu ffn candidates %lld != %d\n", (long long)counts[0], n); fails++; }
    if (fmt != Q8) {   /* the same FFN with its down projection at q8_0 */
        uint8_t *dn8 = random_rows(Q8, n, d);
        double *D8 = malloc(sizeof(double) * (size_t)n * d);
        for (int r = 0; r < n; r++) dequant(Q8, dn8, r, d, D8 + (size_t)r * d);
        (fmt == Q4 ? es_reglu_ffn_q4_q8 : es_reglu_ffn_q41_q8)(x, NULL, NULL, NULL, NULL, NULL, NULL, NULL, g, u, dn8, d,
                                                               0, n, nt, 0.f, got, counts);
        double *w8 = malloc(sizeof(double) * d);
        for (int j = 0; j < d; j++) {
            w8[j] = 0;
            for (int r = 0; r < n; r++) w8[j] += h[r] * D8[(size_t)r * d + j];
        }
        check("reglu ffn (down at q8_0)", fmt, n, d, got, w8, d, ffn_tol);
        free(dn8); free(D8); free(w8);
    }
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
        PICK_FFN(fmt)(x, a_t, b_t, packed ? qa : NULL, sa, packed ? qb : NULL, sb, bias, g, u, dn, d, r, n, nt, 0.f, got, counts);
        check(packed ? "reglu ffn (int8 predictor)" : "reglu ffn (fp32 predictor)", fmt, n, d, got, want, d, ffn_tol);
        if (counts[0] != (n + 1) / 2) { printf("FAIL predictor candidates %lld\n", (long long)counts[0]); fails++; }
    }
    free(a_t); free(b_t); free(bias); free(qa); free(qb); free(sa); free(sb);
    free(w); free(g); free(u); free(dn); free(W); free(G); free(U); free(D); free(x); free(got); free(one);
    free(want); free(h);
}

int main(int argc, char **argv) {
    if (argc > 1) {   /* the torch reference's stored vectors (vectors.py) */
        int n = check_vectors(argv[1]);
        printf("%d stored vectors\n", n);
    }
    check_ops();
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
