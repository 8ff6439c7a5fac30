/* Self-check of the block-quantised kernels for a build that Python cannot load: the aarch64
 * cross builds run under qemu-user (tests/backends/test_cpu_arm.py), and the same driver
 * runs natively on x86, so both architectures meet the same checks.
 *
 * Blocks are random bytes with random positive fp16 scales (and q4_1 minima), so every bit
 * pattern of the quants is exercised; the reference de-quantises those bytes here, in double.
 * Checked: the GEMV (integer dots: the activation's int8 rounding, bound 2e-2 of the result's
 * scale, as tests/backends/test_cpu_quant.py), the four-row dots on odd row counts, and row
 * sums over all, some and no rows.  Prints one line per failure and "ok" at the end. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DECL(F)                                                                                   \
    void es_gemv_##F(const uint8_t *, const float *, const float *, int, int, int, float *);     \
    void es_weighted_rows_##F(const uint8_t *, const int64_t *, const float *, int, int, int, float *);
DECL(q8)
DECL(q4)
DECL(q41)

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

int main(void) {
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
