/* The descriptor of one decoder layer for es_decode_layer (decode_layer.c), built once at load
 * by backends/cpu/layer_step.py (whose ctypes Structures mirror these field by field) and by
 * the ARM check driver (tests/backends/arm/check_ops.c). */
#ifndef ES_DECODE_LAYER_H
#define ES_DECODE_LAYER_H
#include <stdint.h>

enum { FMT_Q8 = 0, FMT_Q4 = 1, FMT_Q41 = 2 };
enum { FFN_SILU = 0, FFN_RELU = 1, FFN_REGLU_SPARSE = 2, FFN_TOPK_SWIGLU = 3 };

typedef struct {
    const uint8_t *w;    /* block rows: [rows, cols] */
    const float *bias;   /* fp32 copy of the bias, or NULL */
    int fmt, rows, cols;
    int k;               /* Top-K linear (w = W^T, rows = inputs): inputs kept; 0: dense GEMV */
} ESLinear;

typedef struct {
    int d, n_heads, n_kv, hd, max_len, bf16;   /* bf16: activations, norms and cache are bf16 */
    float eps;
    const void *attn_norm, *mlp_norm;
    ESLinear qkv, o;
    int ffn, gate_fmt, down_fmt, d_ff, rank;
    int down_rows;   /* dense FFN: down_t holds W_down's rows [d, d_ff] (formats.TransposedRows) */
    const uint8_t *gate, *up, *down_t;
    /* predictor (ffn == FFN_REGLU_SPARSE; a_t and qa both NULL: exact mode) */
    const float *a_t, *b_t, *pbias, *sa, *sb;
    const int8_t *qa, *qb;
    /* ffn == FFN_TOPK_SWIGLU (a SwiGLU under rotated Top-K): gate and up stacked in one Top-K
     * linear [d -> 2 d_ff], silu(g) * u, then the Top-K down linear [d_ff -> d] */
    ESLinear gate_up, down;
    /* LaRoSA's residual basis changes after the attention and after the FFN; w NULL: none */
    ESLinear attn_adapter, adapter;
    /* ffn == FFN_REGLU_SPARSE: a neuron is active where its gate > thr (ReLU: 0; FATReLU: its
     * threshold).  Last, so every field before it keeps its offset. */
    float thr;
} ESLayer;

void es_decode_layer(const ESLayer *L, void *x_io, void *cache_k, void *cache_v, const void *cos,
                     const void *sin, int slot, int first, int nt, int64_t *counts);
void es_decode_layers(const ESLayer *const *L, int n, void *x_io, void *const *cache_k, void *const *cache_v,
                      const void *cos, const void *sin, int slot, int first, int nt, int64_t *counts);
void es_decode_layers_rows(const ESLayer *const *L, int n, int B, void *x_io, void *const *cache_k,
                           void *const *cache_v, const void *cos, const void *sin, const int *slot, const int *first,
                           const int *max_len, int nt, int64_t *counts);
void es_swiglu(int bf16, const void *gu, int n, int f, void *out);
void es_act_mul(const float *g, const float *u, int64_t n, int relu, float *out);
void es_ffn_dense_q(int gate_fmt, int down_fmt, int relu, int down_rows, const uint8_t *gate, const uint8_t *up,
                    const uint8_t *down_t, int d, int f, const float *h, int nt, float *out);
#endif
