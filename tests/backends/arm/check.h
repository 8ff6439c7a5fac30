/* Shared by the ARM check driver's files (check_quant.c, check_ops.c): the kernels' prototypes,
 * a fixed random stream (each file its own, the same on every architecture), random blocks
 * and their double-precision de-quantisation, and the comparison every check uses. */
#ifndef ES_CHECK_H
#define ES_CHECK_H
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
                                const uint8_t *, int, int, int, int, float, float *, int64_t *);
DECL(q8)
DECL(q4)
DECL(q41)
/* the mixed pairs: 4-bit gate/up with a down projection re-quantised to q8_0 */
#define DECL_MIXED(F)                                                                             \
    void es_reglu_ffn_##F##_q8(const float *, const float *, const float *, const int8_t *, const float *, \
                               const int8_t *, const float *, const float *, const uint8_t *, const uint8_t *, \
                               const uint8_t *, int, int, int, int, float, float *, int64_t *);
DECL_MIXED(q4)
DECL_MIXED(q41)
void es_rms_norm_f32(const float *, const float *, float, int, float *);
#define DECL_FLOAT(S, WT)                                                                         \
    void es_gemv_##S(const WT *, const WT *, const WT *, int, int, int, WT *);                   \
    void es_weighted_rows_##S(const WT *, const int64_t *, const WT *, int, int, int, WT *);     \
    void es_topk_linear_##S(const WT *, const WT *, int, int, int, int, WT *);                   \
    void es_reglu_ffn_##S(const WT *, const WT *, const WT *, const int8_t *, const float *, const int8_t *, \
                          const float *, const WT *, const WT *, const WT *, const WT *, int, int, int, int, \
                          float, WT *, int64_t *);
DECL_FLOAT(bf16, uint16_t)
DECL_FLOAT(f32, float)
void es_decode_attention_f32(const float *, const float *, const float *, float *, float *, int, int, int, int,
                             int, int, int, float *);
void es_rms_norm_bf16(const uint16_t *, const uint16_t *, float, int, uint16_t *);
void es_decode_attention_bf16(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, uint16_t *, int, int,
                              int, int, int, int, int, uint16_t *);

static uint32_t rng = 12345u;
static inline uint32_t next(void) { rng = rng * 1664525u + 1013904223u; return rng >> 8; }
static inline float uniform(void) { return (float)next() / 16777216.0f * 2.f - 1.f; }

static inline double half(uint16_t h) {   /* the normal positive halves made below */
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    return ldexp(1.0 + m / 1024.0, e - 15) * ((h & 0x8000) ? -1 : 1);
}
static inline uint16_t rand_half(void) { return (uint16_t)(0x2000 + next() % 0x400); }   /* [2^-7, 2^-6) */

enum { Q8, Q4, Q41 };
static const int BB[] = {34, 18, 20};

/* row r of w [n, d] de-quantised into out[d] */
static inline void dequant(int fmt, const uint8_t *w, int r, int d, double *out) {
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

static inline uint8_t *random_rows(int fmt, int n, int d) {
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

static inline uint16_t to_bf16(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (uint16_t)(u >> 16); }
static inline float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
extern int fails;   /* check_quant.c */
int check_vectors(const char *path);   /* check_vectors.c */
/* max |got - want| <= tol * max(1, max |want|), else one FAIL line (check_quant.c) */
void check(const char *what, int fmt, int n, int d, const float *got, const double *want, int len, double tol);

static inline double dotd(const double *w, const float *x, int d) {
    double s = 0;
    for (int j = 0; j < d; j++) s += w[j] * x[j];
    return s;
}

#endif
