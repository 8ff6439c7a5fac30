"""The cpu backend: the executor interface with plain torch ops.

Every sparse op reads only the rows it needs, from the contiguous row layouts chosen in
``prepare_*``: ``F.embedding`` gathers gate/up rows for a small GEMM, and the down projection
and Top-K linear are ``F.embedding_bag`` sums of the selected rows weighted by the activations,
which read each row once and materialise nothing.  (``index_select`` would do the same job but
is ~20x slower on fp32 CPU tensors in torch 2.13; measured in docs/performance.md.)  No dense
mask is ever multiplied by zero.  The cann backend reuses these ops on the ``npu`` device."""
from __future__ import annotations

import mmap

import torch
import torch.nn.functional as F

from edgesparse.predictors.int8 import int8_rows

from . import native
from .interface import Executor, FFNWeights, LinearWeights, PredictorWeights, TopKWeights, activate, topk_indices


# Above this share of a matrix's rows a sparse op reads all rows densely instead of gathering:
# on the 2-core CPU gathering 50% of the rows is 3.5x slower than the dense FFN, and the sparse
# path starts to win between 60% and 70% sparsity (bench/results/cpu_ffn_sweep.json).
DENSE_SHARE = 0.35


class TorchExecutor(Executor):
    """Device-agnostic torch implementation; ``CpuExecutor`` and ``CannExecutor`` bind a device."""

    def linear(self, x, w: LinearWeights):
        return F.linear(x, w.weight, w.bias)

    def ffn_dense(self, x, w: FFNWeights):
        h = activate(F.linear(x, w.gate), w.act) * F.linear(x, w.up)
        if h.dim() == 2 and h.shape[0] == 1:
            # One token: a weighted sum of all down_t rows reads them in their stored order
            # (2x faster than h @ down_t, whose transposed GEMV is slow on CPU).
            return weighted_row_sum(w.down_t, torch.arange(h.shape[1], device=h.device), h)
        return h @ w.down_t

    def gate_rows(self, x, w: FFNWeights, idx):
        if idx.numel() > DENSE_SHARE * w.gate.shape[0]:
            return F.linear(x, w.gate)[:, idx]
        return x @ F.embedding(idx, w.gate).t()

    def up_down_rows(self, x, h, w: FFNWeights, idx):
        n_rows = w.up.shape[0]
        if idx.numel() > DENSE_SHARE * n_rows:
            # Many rows: reading all of them in order beats gathering (see docs/performance.md).
            full = torch.zeros(x.shape[0], n_rows, dtype=h.dtype, device=h.device)
            full[:, idx] = h
            coef = full * F.linear(x, w.up)
            return weighted_row_sum(w.down_t, torch.arange(n_rows, device=x.device), coef)
        u = x @ F.embedding(idx, w.up).t()
        return weighted_row_sum(w.down_t, idx, h * u)

    def topk_linear(self, x, w: TopKWeights, k=None):
        k = w.k if k is None else k
        if k >= w.weight_t.shape[0]:
            out = x @ w.weight_t
        elif x.shape[0] == 1:
            idx = topk_indices(x[0], k)
            out = weighted_row_sum(w.weight_t, idx, x[:, idx])
        else:
            # Batch > 1: per-token Top-K (each token keeps its own K entries).  The union of
            # kept rows over several tokens is most rows, so one masked GEMM is cheaper.
            idx = topk_indices(x, k)
            out = torch.zeros_like(x).scatter_(1, idx, x.gather(1, idx)) @ w.weight_t
        return out if w.bias is None else out + w.bias

    def lowrank_scores(self, x, p: PredictorWeights):
        return torch.addmm(p.bias, x @ p.a, p.b) if x.dim() == 2 else (x @ p.a) @ p.b + p.bias


class CpuExecutor(TorchExecutor):
    """Torch ops, plus the native fused kernels (``native.py``) for single-token decode when
    they built on this machine; the torch ops remain the reference and the fallback."""
    name = "cpu"

    @classmethod
    def availability(cls):
        return True, f"{torch.get_num_threads()} threads, {native.status()}"

    def place(self, t, dtype=None):
        t = super().place(t, dtype)
        # Already 2 MB-aligned means placed before (e.g. a tied lm_head, the gate's view for
        # exact mode): placing again must not copy the weights a second time.
        if t.numel() * t.element_size() < HUGE_PAGE or t.data_ptr() % HUGE_PAGE == 0:
            return t
        return huge_page_copy(t)

    def prepare_predictor(self, a, b, bias) -> PredictorWeights:
        # Stored transposed ([r, d] and [d_ff, r]) so each output of the native kernel reads a
        # contiguous row; the torch ops use the transposed views at no cost.  Factors that
        # calibration left on per-row int8 grids are also kept as int8 rows for the native
        # kernel (half the predictor's bytes per token; the torch ops use the float copies,
        # which hold the same values).
        p = PredictorWeights(self.place(a.t()).t(), self.place(b.t()).t(), self.place(bias))
        qa, qb = int8_rows(p.a.t()), int8_rows(p.b.t())   # each may be off its grid (rotated A)
        if qa is not None or qb is not None:
            pack = lambda rows: (None, None) if rows is None else (self.place(rows.q), rows.s)  # noqa: E731
            p.packed = (*pack(qa), *pack(qb))
        return p

    def linear(self, x, w: LinearWeights):
        if x.numel() == x.shape[-1] and native.supports(w.weight):   # one token
            return native.gemv(w.weight, x.reshape(-1), w.bias).view(*x.shape[:-1], -1)
        return super().linear(x, w)

    def rms_norm(self, x, weight, eps):
        if x.numel() == x.shape[-1] and x.dtype == weight.dtype and native.supports(weight):
            return native.rms_norm(x.reshape(-1), weight, eps).view(x.shape)
        return super().rms_norm(x, weight, eps)

    def decode_attention(self, qkv, cos, sin, cache_k, cache_v, slot, first, n_heads):
        if native.supports(cache_k, cache_v, qkv, cos, sin):
            return native.decode_attention(qkv, cos, sin, cache_k, cache_v, slot, first, n_heads)
        return super().decode_attention(qkv, cos, sin, cache_k, cache_v, slot, first, n_heads)

    def ffn_dense(self, x, w: FFNWeights):
        if x.dim() == 2 and x.shape[0] == 1 and native.supports(w.down_t):
            # One token: gate/up as native GEMVs, the down projection as one native pass over
            # down_t's rows (embedding_bag over all rows ran at ~8 GB/s inside decode).
            h = activate(self.linear(x, LinearWeights(w.gate)), w.act) * self.linear(x, LinearWeights(w.up))
            return native.weighted_rows(w.down_t, None, h[0]).unsqueeze(0)
        return super().ffn_dense(x, w)

    def reglu_sparse(self, x, w, p):
        if x.shape[0] == 1 and native.supports(w.gate, w.up, w.down_t, *(() if p is None else (p.a.t(), p.b.t()))):
            out, n_cand, n_active = native.reglu_ffn(
                x[0], w.gate, w.up, w.down_t, *((None, None, None, None) if p is None else
                                                (p.a.t(), p.b.t(), p.bias, p.packed)))
            return out.unsqueeze(0), n_cand, n_active
        return super().reglu_sparse(x, w, p)

    def topk_linear(self, x, w: TopKWeights, k=None):
        k = w.k if k is None else k
        if x.shape[0] == 1 and k < w.weight_t.shape[0] and native.supports(w.weight_t):
            out = native.topk_linear(w.weight_t, x[0], k).unsqueeze(0)
            return out if w.bias is None else out + w.bias
        return super().topk_linear(x, w, k)


HUGE_PAGE = 2 << 20


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into 2 MB-aligned anonymous memory advised for transparent huge pages.

    Sparse decode reads scattered 4-8 KB rows spread over hundreds of MB: with 4 KB pages
    nearly every row costs a TLB miss and a page walk (a nested one in a VM).  With 2 MB pages
    the gathered rows ran ~8% faster on the dev VM (docs/performance.md).  Where the OS has
    no such advice (or THP is off) this is an ordinary private mapping and costs nothing."""
    if not (hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")):
        return t
    nbytes = t.numel() * t.element_size()
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)   # before the first touch, so faults take 2 MB pages
    except OSError:   # a kernel built without THP: ordinary pages, still correct
        pass
    raw = torch.frombuffer(buf, dtype=torch.uint8)   # the tensor's storage keeps buf alive
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(t.dtype).view(t.shape).copy_(t)


def weighted_row_sum(weight: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``coef [B, n] @ weight[idx]`` -> ``[B, d]``, reading each selected row once, in place."""
    bsz, n = coef.shape
    if n == 0:
        return coef.new_zeros(bsz, weight.shape[1])
    return F.embedding_bag(idx.expand(bsz, n), weight, per_sample_weights=coef.to(weight.dtype), mode="sum")
