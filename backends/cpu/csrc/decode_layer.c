/* One decoder layer of a single-token decode step in one native call (cpu backend,
 * backends/cpu/layer_step.py): RMSNorm -> q/k/v (dense or Top-K) -> RoPE, cache write and
 * attention -> o -> residual [-> adapter] -> RMSNorm -> FFN (dense, exact or predictor-sparse
 * ReGLU, or a Top-K SwiGLU) -> residual [-> adapter], over block-quantised weights (q8_0 / q4_0 /
 * q4_1).
 *
 * Why: at batch 1 a small model's token is mostly not weight streaming but ~15 Python-level
 * executor calls per layer, each with ctypes marshalling, a torch allocation and a dtype
 * conversion (SmolLM2-135M: 30 layers).  The layer is described once (ESLayer, built from the
 * executor's prepared weights) and this function calls the same kernels the composed path
 * calls, in the same order, rounding to the activation dtype (bf16 or fp32) at the points
 * where the composed path converts each op's result: the native step is checked against the
 * composed one (tests/backends/test_cpu_layer_step.py), which stays the reference. */
#include "common.h"

/* the kernels of sparse_rows.c / quant_rows.h and decode_ops.c */
#define DECLARE_Q(F)                                                                              \
    void es_gemv_##F(const uint8_t *, const float *, const float *, int, int, int, float *);     \
    void es_gate_up_##F(const uint8_t *, const uint8_t *, const float *, int, int, int, int, float *); \
    void es_weighted_rows_##F(const uint8_t *, const int64_t *, const float *, int, int, int, float *); \
    void es_topk_linear_##F(const uint8_t *, const float *, int, int, int, int, float *);           \
    void es_gemm_##F(const uint8_t *, const float *, const float *, int, int, int, int, float *);
DECLARE_Q(q8)
DECLARE_Q(q4)
DECLARE_Q(q41)
#define DECLARE_FFN(F, FD)                                                                        \
    void es_reglu_ffn_##F##_##FD(const float *, const float *, const float *, const int8_t *,     \
                                 const float *, const int8_t *, const float *, const float *,     \
                                 const uint8_t *, const uint8_t *, const uint8_t *, int, int, int, int, \
                                 float, float *, int64_t *);
DECLARE_FFN(q8, q8)
DECLARE_FFN(q4, q4)
DECLARE_FFN(q41, q41)
DECLARE_FFN(q4, q8)
DECLARE_FFN(q41, q8)
void es_decode_attention_bf16(const uint16_t *, const uint16_t *, const uint16_t *, uint16_t *, uint16_t *,
                              int, int, int, int, int, int, int, uint16_t *);
void es_decode_attention_f32(const float *, const float *, const float *, float *, float *,
                             int, int, int, int, int, int, int, float *);

#include "decode_layer.h"

/* the composed path's conversion of an op's fp32 result to the activation dtype */
static inline float rnd(int bf16, float v) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }
static inline float ld(int bf16, const void *p, int i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* es_rms_norm_<dtype> on values already in the activation dtype */
static void norm(const ESLayer *L, const float *x, const void *w, float *out) {
    float ss = 0.f;
    for (int i = 0; i < L->d; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)L->d + L->eps);
    for (int i = 0; i < L->d; i++) out[i] = rnd(L->bf16, ld(L->bf16, w, i) * rnd(L->bf16, x[i] * r));
}

static void gemv_fmt(int fmt, const uint8_t *w, const float *x, const float *bias, int n, int d, int nt, float *out) {
    switch (fmt) {
    case FMT_Q8: es_gemv_q8(w, x, bias, n, d, nt, out); break;
    case FMT_Q4: es_gemv_q4(w, x, bias, n, d, nt, out); break;
    default: es_gemv_q41(w, x, bias, n, d, nt, out);
    }
}

/* out[d_out] = sum_j coef[j] * row j of w_t [n, d_out] (a neuron-major down projection) */
static void weighted_rows_fmt(int fmt, const uint8_t *w_t, const float *coef, int n, int d_out, int nt, float *out) {
    switch (fmt) {
    case FMT_Q8: es_weighted_rows_q8(w_t, NULL, coef, n, d_out, nt, out); break;
    case FMT_Q4: es_weighted_rows_q4(w_t, NULL, coef, n, d_out, nt, out); break;
    default: es_weighted_rows_q41(w_t, NULL, coef, n, d_out, nt, out);
    }
}

static void linear(const ESLayer *L, const ESLinear *w, const float *x, int nt, float *out) {
    int n_out = w->k ? w->cols : w->rows;
    if (w->k) {
        switch (w->fmt) {
        case FMT_Q8: es_topk_linear_q8(w->w, x, w->rows, w->cols, w->k, nt, out); break;
        case FMT_Q4: es_topk_linear_q4(w->w, x, w->rows, w->cols, w->k, nt, out); break;
        default: es_topk_linear_q41(w->w, x, w->rows, w->cols, w->k, nt, out);
        }
        for (int i = 0; i < n_out; i++)   /* Top-K: the bias is added after the conversion */
            out[i] = w->bias ? rnd(L->bf16, rnd(L->bf16, out[i]) + w->bias[i]) : rnd(L->bf16, out[i]);
        return;
    }
    gemv_fmt(w->fmt, w->w, x, w->bias, w->rows, w->cols, nt, out);
    for (int i = 0; i < n_out; i++) out[i] = rnd(L->bf16, out[i]);
}

/* A Top-K MLP's activation, silu(g) * u over gate|up stacked [2f], with the roundings of the
 * composed path's torch ops (silu rounded to the activation dtype, then the product rounded).
 * Also that path's op (Executor.swiglu_stacked -> native.swiglu), for the reason es_ffn_dense_q
 * gives: one code for the activation in both paths, or Top-K selections drift apart. */
static void swiglu_row(int bf16, const float *gu, int f, float *out) {
    for (int i = 0; i < f; i++) {
        float g = gu[i];
        out[i] = rnd(bf16, rnd(bf16, g / (1.f + expf(-g))) * gu[f + i]);
    }
}

/* n rows of gu [n, 2f] -> out [n, f], in the activation dtype */
void es_swiglu(int bf16, const void *gu, int n, int f, void *out) {
    float *a = (float *)malloc(sizeof(float) * (size_t)(3 * f));
    float *h = a + 2 * f;
    for (int r = 0; r < n; r++) {
        for (int i = 0; i < 2 * f; i++) a[i] = ld(bf16, gu, r * 2 * f + i);
        swiglu_row(bf16, a, f, h);
        for (int i = 0; i < f; i++) {
            if (bf16) ((uint16_t *)out)[(size_t)r * f + i] = f32_to_bf16(h[i]);
            else ((float *)out)[(size_t)r * f + i] = h[i];
        }
    }
    free(a);
}

/* act(g) * u elementwise in fp32, the expression es_gate_up_* applies inside its dots: the
 * dense FFN of several tokens (prefill, batched decode) uses it so a batched token's FFN is the
 * single-token one to the bit (its GEMMs equal the GEMVs per token). */
void es_act_mul(const float *g, const float *u, int64_t n, int relu, float *out) {
    for (int64_t i = 0; i < n; i++) {
        float v = g[i];
        out[i] = (relu ? (v > 0.f ? v : 0.f) : v / (1.f + expf(-v))) * u[i];
    }
}

/* The dense gated FFN of one token over block rows: act(gate . h) * (up . h), then the
 * down projection as a row sum over down_t, or (down_rows) as integer dots against W_down's
 * own rows, the faster kernel where the layout allows it; fp32 in and out.  Also the composed path's
 * ffn_dense (native.q_ffn_dense), so both paths compute the activation with the same code:
 * the int8 rounding of the next op's input turns any last-bit difference (torch's SiLU vs
 * this one) into visibly different logits a few layers on. */
void es_ffn_dense_q(int gate_fmt, int down_fmt, int relu, int down_rows, const uint8_t *gate, const uint8_t *up,
                    const uint8_t *down_t, int d, int f, const float *h, int nt, float *out) {
    float *g = (float *)malloc(sizeof(float) * (size_t)f);
    switch (gate_fmt) {
    case FMT_Q8: es_gate_up_q8(gate, up, h, f, d, relu, nt, g); break;
    case FMT_Q4: es_gate_up_q4(gate, up, h, f, d, relu, nt, g); break;
    default: es_gate_up_q41(gate, up, h, f, d, relu, nt, g);
    }
    if (down_rows) {
        gemv_fmt(down_fmt, down_t, g, NULL, d, f, nt, out);
        free(g);
        return;
    }
    weighted_rows_fmt(down_fmt, down_t, g, f, d, nt, out);
    free(g);
}

/* out [d] (fp32, not yet rounded); counts = (gate rows, active rows) of a sparse FFN */
static void ffn(const ESLayer *L, const float *h, int nt, float *out, int64_t *counts) {
    const int d = L->d, f = L->d_ff;
    if (L->ffn == FFN_TOPK_SWIGLU) {   /* each Top-K linear's result is rounded (linear) */
        float *gu = (float *)malloc(sizeof(float) * (size_t)(3 * f));
        linear(L, &L->gate_up, h, nt, gu);
        swiglu_row(L->bf16, gu, f, gu + 2 * f);
        linear(L, &L->down, gu + 2 * f, nt, out);
        free(gu);
        counts[0] = counts[1] = f;
        return;
    }
    if (L->ffn == FFN_REGLU_SPARSE) {
#define CALL(F, FD) es_reglu_ffn_##F##_##FD(h, L->a_t, L->b_t, L->qa, L->sa, L->qb, L->sb, L->pbias, L->gate, \
                                            L->up, L->down_t, d, L->rank, f, nt, L->thr, out, counts)
        if (L->gate_fmt == FMT_Q8) CALL(q8, q8);
        else if (L->gate_fmt == FMT_Q4) { if (L->down_fmt == FMT_Q4) CALL(q4, q4); else CALL(q4, q8); }
        else { if (L->down_fmt == FMT_Q41) CALL(q41, q41); else CALL(q41, q8); }
#undef CALL
        return;
    }
    es_ffn_dense_q(L->gate_fmt, L->down_fmt, L->ffn == FFN_RELU, L->down_rows, L->gate, L->up, L->down_t, d, f, h, nt, out);
    counts[0] = counts[1] = f;
}

/* ---- one decode step of B independent sequences (B = 1: es_decode_layer; more: batching.py's
 * `rows`) ----
 * Each sequence appends one token to its own cache at its own slot.  Every dense linear runs
 * as one GEMM over the B tokens (each block row is read once per step and dotted with all of
 * them; es_gemm_F equals es_gemv_F per token to the bit), so a token's result is the one
 * es_decode_layer gives it alone.  What depends on the token's own values runs per token with
 * the single-token code: attention over its cache, Top-K selections and the predictor-sparse
 * FFN (each token its own active rows). */
static void gemm_fmt(int fmt, const uint8_t *w, const float *x, const float *bias, int n, int d, int B, int nt,
                     float *out) {
    switch (fmt) {
    case FMT_Q8: es_gemm_q8(w, x, bias, n, d, B, nt, out); break;
    case FMT_Q4: es_gemm_q4(w, x, bias, n, d, B, nt, out); break;
    default: es_gemm_q41(w, x, bias, n, d, B, nt, out);
    }
}

/* out[B, n_out] = linear(x[B, n_in]) as `linear` gives each row */
static void linear_rows(const ESLayer *L, const ESLinear *w, const float *x, int B, int nt, float *out) {
    int n_in = w->k ? w->rows : w->cols, n_out = w->k ? w->cols : w->rows;
    if (w->k || B == 1) {
        for (int b = 0; b < B; b++) linear(L, w, x + (int64_t)b * n_in, nt, out + (int64_t)b * n_out);
        return;
    }
    gemm_fmt(w->fmt, w->w, x, w->bias, w->rows, w->cols, B, nt, out);
    for (int64_t i = 0; i < (int64_t)B * n_out; i++) out[i] = rnd(L->bf16, out[i]);
}

/* the FFN of B rows h[B, d] -> out[B, d] (fp32, not yet rounded) */
static void ffn_rows(const ESLayer *L, const float *h, int B, int nt, float *out, int64_t *counts) {
    const int d = L->d, f = L->d_ff;
    if (B == 1 || (L->ffn != FFN_SILU && L->ffn != FFN_RELU)) {
        for (int b = 0; b < B; b++) ffn(L, h + (int64_t)b * d, nt, out + (int64_t)b * d, counts + 2 * b);
        return;
    }
    /* the dense FFN: es_ffn_dense_q's gate/up dots and activation, as GEMMs */
    float *g = (float *)malloc(sizeof(float) * (size_t)B * 2 * f), *u = g + (size_t)B * f;
    gemm_fmt(L->gate_fmt, L->gate, h, NULL, f, d, B, nt, g);
    gemm_fmt(L->gate_fmt, L->up, h, NULL, f, d, B, nt, u);
    es_act_mul(g, u, (int64_t)B * f, L->ffn == FFN_RELU, g);
    if (L->down_rows) {
        gemm_fmt(L->down_fmt, L->down_t, g, NULL, d, f, B, nt, out);
    } else {
        for (int b = 0; b < B; b++)
            weighted_rows_fmt(L->down_fmt, L->down_t, g + (size_t)b * f, f, d, nt, out + (int64_t)b * d);
    }
    for (int b = 0; b < B; b++) counts[2 * b] = counts[2 * b + 1] = f;
    free(g);
}

/* x <- x . A for B rows (a residual basis change, LaRoSA), rounded as the composed linear;
 * y: scratch [B, d] */
static void adapt(const ESLayer *L, const ESLinear *a, float *x, float *y, int B, int nt) {
    if (!a->w) return;
    linear_rows(L, a, x, B, nt, y);
    memcpy(x, y, sizeof(float) * (size_t)B * L->d);
}

/* x_io [B, d] (activation dtype) in place; cache_k/cache_v [B] (each sequence's cache of this
 * layer, max_len[b] slots: L->max_len is ignored), cos/sin [B, hd] (each token's RoPE row),
 * slot/first [B]; counts [B, 2]. */
static void decode_layer_rows(const ESLayer *L, int B, void *x_io, void *const *cache_k, void *const *cache_v,
                              const void *cos, const void *sin, const int *slot, const int *first,
                              const int *max_len, int nt, int64_t *counts) {
    const int d = L->d, hd = L->hd, nq = L->n_heads * hd, nqkv = L->qkv.k ? L->qkv.cols : L->qkv.rows;
    const size_t es = L->bf16 ? 2 : 4;
    float *x = (float *)malloc(sizeof(float) * (size_t)B * (3 * d + nqkv + nq) + es * (size_t)(nqkv + nq));
    float *h = x + (size_t)B * d, *y = h + (size_t)B * d, *qkv = y + (size_t)B * d, *att = qkv + (size_t)B * nqkv;
    void *tmp = att + (size_t)B * nq;
    for (int64_t i = 0; i < (int64_t)B * d; i++) x[i] = ld(L->bf16, x_io, i);

    for (int b = 0; b < B; b++) norm(L, x + (size_t)b * d, L->attn_norm, h + (size_t)b * d);
    linear_rows(L, &L->qkv, h, B, nt, qkv);
    for (int b = 0; b < B; b++) {
        const float *qb = qkv + (size_t)b * nqkv;
        float *ab = att + (size_t)b * nq;
        const char *cb = (const char *)cos + es * (size_t)b * hd, *sb = (const char *)sin + es * (size_t)b * hd;
        if (L->bf16) {
            uint16_t *q16 = (uint16_t *)tmp, *o16 = q16 + nqkv;
            for (int i = 0; i < nqkv; i++) q16[i] = f32_to_bf16(qb[i]);
            es_decode_attention_bf16(q16, (const uint16_t *)cb, (const uint16_t *)sb, (uint16_t *)cache_k[b],
                                     (uint16_t *)cache_v[b], L->n_heads, L->n_kv, hd, max_len[b], slot[b], first[b],
                                     nt, o16);
            for (int i = 0; i < nq; i++) ab[i] = bf16_to_f32(o16[i]);
        } else {
            es_decode_attention_f32(qb, (const float *)cb, (const float *)sb, (float *)cache_k[b], (float *)cache_v[b],
                                    L->n_heads, L->n_kv, hd, max_len[b], slot[b], first[b], nt, ab);
        }
    }
    linear_rows(L, &L->o, att, B, nt, y);
    for (int64_t i = 0; i < (int64_t)B * d; i++) x[i] = rnd(L->bf16, x[i] + y[i]);
    adapt(L, &L->attn_adapter, x, y, B, nt);

    for (int b = 0; b < B; b++) norm(L, x + (size_t)b * d, L->mlp_norm, h + (size_t)b * d);
    ffn_rows(L, h, B, nt, y, counts);
    for (int64_t i = 0; i < (int64_t)B * d; i++) x[i] = rnd(L->bf16, x[i] + rnd(L->bf16, y[i]));
    adapt(L, &L->adapter, x, y, B, nt);
    for (int64_t i = 0; i < (int64_t)B * d; i++) {
        if (L->bf16) ((uint16_t *)x_io)[i] = f32_to_bf16(x[i]);
        else ((float *)x_io)[i] = x[i];
    }
    free(x);
}

/* Every layer for B sequences: cache_k/cache_v [B * n] (sequence b's layer i at b * n + i),
 * counts [n, B, 2]. */
void es_decode_layers_rows(const ESLayer *const *L, int n, int B, void *x_io, void *const *cache_k,
                           void *const *cache_v, const void *cos, const void *sin, const int *slot, const int *first,
                           const int *max_len, int nt, int64_t *counts) {
    void **ck = (void **)malloc(sizeof(void *) * (size_t)B * 2), **cv = ck + B;
    for (int i = 0; i < n; i++) {
        for (int b = 0; b < B; b++) {
            ck[b] = cache_k[(size_t)b * n + i];
            cv[b] = cache_v[(size_t)b * n + i];
        }
        decode_layer_rows(L[i], B, x_io, ck, cv, cos, sin, slot, first, max_len, nt, counts + (size_t)2 * B * i);
    }
    free(ck);
}

/* x [d] (activation dtype) is updated in place; cos/sin: this position's RoPE rows.  The
 * batched layer at B = 1: every op there is then the one-token op (GEMV, not GEMM). */
void es_decode_layer(const ESLayer *L, void *x_io, void *cache_k, void *cache_v, const void *cos,
                     const void *sin, int slot, int first, int nt, int64_t *counts) {
    decode_layer_rows(L, 1, x_io, &cache_k, &cache_v, cos, sin, &slot, &first, &L->max_len, nt, counts);
}

/* Every layer of a decode step: one call per token instead of one per layer (the per-call
 * Python work, ~10 us a layer, was ~5% of a SmolLM2 token). */
void es_decode_layers(const ESLayer *const *L, int n, void *x_io, void *const *cache_k, void *const *cache_v,
                      const void *cos, const void *sin, int slot, int first, int nt, int64_t *counts) {
    for (int i = 0; i < n; i++)
        es_decode_layer(L[i], x_io, cache_k[i], cache_v[i], cos, sin, slot, first, nt, counts + 2 * i);
}
