"""One native call per decoder layer for single-token decode (``csrc/decode_layer.c``).

A ``LayerStep`` (the decoder's description of a layer in the executor's weight types) is
turned once into a C descriptor, ``ESLayer``: pointers to the block rows, formats, shapes,
fp32 copies of biases and the predictor.  Each decode step then costs one ctypes call per
layer instead of ~15 executor calls, each with its own marshalling, allocations and dtype
conversions (docs/performance.md).  Covered: block-quantised weights (q8_0 / q4_0 / q4_1)
throughout the layer, bf16 or fp32 activations, dense or Top-K attention projections, a
dense (SiLU / ReLU) or sparse ReGLU FFN or a Top-K SwiGLU, and LaRoSA's residual adapters.
Anything else (float weights, a Top-K layer run densely) returns None and the decoder
composes the layer from executor ops."""
from __future__ import annotations

import ctypes

import torch

from ..formats import TransposedRows
from ..interface import LayerStep, LinearWeights, TopKWeights
from . import native

_FMT = native.FMT_CODE
_SILU, _RELU, _REGLU_SPARSE, _TOPK_SWIGLU = 0, 1, 2, 3
_ACT = {torch.bfloat16: 1, torch.float32: 0}
_P, _I = ctypes.c_void_p, ctypes.c_int


class ESLinear(ctypes.Structure):
    _fields_ = [("w", _P), ("bias", _P), ("fmt", _I), ("rows", _I), ("cols", _I), ("k", _I)]


class ESLayer(ctypes.Structure):
    _fields_ = [("d", _I), ("n_heads", _I), ("n_kv", _I), ("hd", _I), ("max_len", _I), ("bf16", _I),
                ("eps", ctypes.c_float), ("attn_norm", _P), ("mlp_norm", _P), ("qkv", ESLinear), ("o", ESLinear),
                ("ffn", _I), ("gate_fmt", _I), ("down_fmt", _I), ("d_ff", _I), ("rank", _I), ("down_rows", _I),
                ("gate", _P), ("up", _P), ("down_t", _P),
                ("a_t", _P), ("b_t", _P), ("pbias", _P), ("sa", _P), ("sb", _P), ("qa", _P), ("qb", _P),
                ("gate_up", ESLinear), ("down", ESLinear), ("attn_adapter", ESLinear), ("adapter", ESLinear),
                ("thr", ctypes.c_float)]


def _fn():
    lib = native.lib()
    if lib is None:
        return None
    fn = lib.es_decode_layer
    if fn.argtypes is None:
        fn.argtypes, fn.restype = [ctypes.POINTER(ESLayer), _P, _P, _P, _P, _P, _I, _I, _I, _P], None
    return fn


class Plan:
    """The descriptor of one layer and everything it points into (kept alive with it)."""

    def __init__(self, desc: ESLayer, keep: list):
        self.desc, self.keep = desc, keep
        self.ref = ctypes.byref(desc)


def _linear(w, keep: list) -> ESLinear | None:
    """A dense linear, or a Top-K one that really skips inputs (K = all is the torch path's)."""
    mat = w.weight if isinstance(w, LinearWeights) else w.weight_t
    if not native.supports_quant(mat):
        return None
    k = 0
    if isinstance(w, TopKWeights):
        if not 0 < w.k < mat.shape[0]:
            return None
        k = w.k
    bias = None if w.bias is None else w.bias.float().contiguous()
    keep += [mat, bias]
    return ESLinear(mat.data.data_ptr(), 0 if bias is None else bias.data_ptr(), _FMT[mat.fmt], mat.shape[0], mat.cols, k)


def build(step: LayerStep, cache_k: torch.Tensor, act_dtype: torch.dtype) -> Plan | None:
    """The native descriptor of ``step``, or None where the native step does not cover it."""
    if _fn() is None or act_dtype not in _ACT or cache_k.dtype != act_dtype or not cache_k.is_contiguous():
        return None
    if step.attn_norm.dtype != act_dtype or step.mlp_norm.dtype != act_dtype:
        return None
    keep: list = [step.attn_norm, step.mlp_norm]
    lins = {k: _linear(w, keep) for k, w in (("qkv", step.qkv), ("o", step.o))}
    for k, w in (("attn_adapter", step.attn_adapter), ("adapter", step.adapter)):
        if w is not None:
            lins[k] = _linear(w, keep)
    if any(v is None for v in lins.values()):
        return None
    n_kv, max_len, hd = cache_k.shape
    desc = ESLayer(d=step.attn_norm.numel(), n_heads=step.n_heads, n_kv=n_kv, hd=hd, max_len=max_len,
                   bf16=_ACT[act_dtype], eps=step.eps, attn_norm=step.attn_norm.data_ptr(),
                   mlp_norm=step.mlp_norm.data_ptr(), **lins)
    f = step.ffn
    if f is None:   # a SwiGLU under Top-K: two Top-K linears that really skip inputs
        gate_up, down = (_linear(w, keep) for w in step.topk_mlp)
        if gate_up is None or down is None or not isinstance(step.topk_mlp[0], TopKWeights):
            return None
        desc.ffn, desc.gate_up, desc.down, desc.d_ff = _TOPK_SWIGLU, gate_up, down, down.rows
        return Plan(desc, keep)
    if not native.supports_dense_ffn(f.gate, f.up, f.down_t):
        return None
    desc.gate_fmt, desc.down_fmt, desc.d_ff = _FMT[f.gate.fmt], _FMT[f.down_t.fmt], f.gate.shape[0]
    desc.gate, desc.up, desc.down_t = f.gate.data.data_ptr(), f.up.data.data_ptr(), f.down_t.data.data_ptr()
    desc.down_rows = int(isinstance(f.down_t, TransposedRows))
    if not step.ffn_sparse:
        if f.act not in ("silu", "relu"):
            return None
        desc.ffn = _SILU if f.act == "silu" else _RELU
    else:
        if not native.supports_ffn(f.gate, f.up, f.down_t):
            return None
        desc.ffn, desc.thr = _REGLU_SPARSE, f.threshold   # ReLU: 0; FATReLU: its threshold
        p = step.predictor
        if p is not None:
            if not p.fp32:
                return None
            a_t, b_t, bias = p.fp32
            qa, sa, qb, sb = p.packed or (None,) * 4
            desc.rank = qa.shape[0] if qa is not None else a_t.shape[0]
            for name, t in (("a_t", a_t), ("b_t", b_t), ("pbias", bias), ("qa", qa), ("sa", sa), ("qb", qb), ("sb", sb)):
                if t is not None:
                    t = t.contiguous()
                    keep.append(t)
                    setattr(desc, name, t.data_ptr())
    return Plan(desc, keep)


def _inputs(x, cos, sin, dtype):
    """A fresh copy of x (the C code updates it in place) and the RoPE rows, in the cache's
    dtype and contiguous; the caller holds them while C reads them."""
    return x.to(dtype).contiguous().clone(), cos.to(dtype).contiguous(), sin.to(dtype).contiguous()


class Stack:
    """The plans of all layers as one C array, for ``es_decode_layers``."""

    def __init__(self, plans: list[Plan]):
        self.plans = plans
        self.ptrs = (ctypes.POINTER(ESLayer) * len(plans))(*[ctypes.pointer(p.desc) for p in plans])
        self.counts = (ctypes.c_int64 * (2 * len(plans)))()


def run_all(stack: Stack, x: torch.Tensor, caches_k, caches_v, cos, sin, slot: int, first: int):
    """``x [d]`` -> ``(x_out [d], [(gate_rows, active_rows) per layer])`` through every layer;
    ``caches_*``: the layers' ``[1, n_kv, S, hd]`` caches."""
    n = len(stack.plans)
    out, cos, sin = _inputs(x, cos, sin, caches_k[0].dtype)
    ck = (_P * n)(*[t.data_ptr() for t in caches_k])
    cv = (_P * n)(*[t.data_ptr() for t in caches_v])
    native.lib().es_decode_layers(stack.ptrs, n, out.data_ptr(), ck, cv, cos.data_ptr(), sin.data_ptr(), slot,
                                  first, torch.get_num_threads(), stack.counts)
    c = stack.counts
    return out, [(c[2 * i], c[2 * i + 1]) for i in range(n)]


def run_rows(stack: Stack, x: torch.Tensor, caches_k, caches_v, cos, sin, slots: list[int], firsts: list[int]):
    """One decode step of B sequences (continuous batching): ``x [B, d]`` -> ``(x_out [B, d],
    counts [n_layers, B, 2])``; ``caches_*[b][l]``: sequence b's layer-l ``[1, n_kv, S, hd]``
    cache (each its own length), ``cos``/``sin [B, hd]``, ``slots``/``firsts`` per sequence.
    Each token's result is the one ``run_all`` gives it alone (csrc/decode_layer.c)."""
    n, B = len(stack.plans), x.shape[0]
    out, cos, sin = _inputs(x, cos, sin, caches_k[0][0].dtype)
    ck = (_P * (n * B))(*[t.data_ptr() for seq in caches_k for t in seq])
    cv = (_P * (n * B))(*[t.data_ptr() for seq in caches_v for t in seq])
    counts = torch.zeros(n, B, 2, dtype=torch.int64)
    native.lib().es_decode_layers_rows(stack.ptrs, n, B, out.data_ptr(), ck, cv, cos.data_ptr(), sin.data_ptr(),
                                       (_I * B)(*slots), (_I * B)(*firsts), (_I * B)(*[seq[0].shape[2] for seq in caches_k]),
                                       torch.get_num_threads(),
                                       counts.data_ptr())
    return out, counts


def run(plan: Plan, x: torch.Tensor, cache_k, cache_v, cos, sin, slot: int, first: int):
    """``x [d]`` -> ``(x_out [d], gate_rows, active_rows)`` through the native layer."""
    out, cos, sin = _inputs(x, cos, sin, cache_k.dtype)
    counts = (ctypes.c_int64 * 2)()
    _fn()(plan.ref, out.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
          slot, first, torch.get_num_threads(), counts)
    return out, counts[0], counts[1]
