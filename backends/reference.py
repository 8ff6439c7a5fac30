"""The reference executor: every operation of the interface as plain torch ops on any device.

The cpu backend overrides single-token ops with its native kernels and the cuda backend with
Triton; cann runs these ops as they are on the ``npu`` device.  Every fast path is tested
against this class.  Each sparse op reads only the rows it needs, from the contiguous row
layouts chosen in ``prepare_*``: ``F.embedding`` gathers gate/up rows for a small GEMM, and
the down projection and Top-K linear are ``F.embedding_bag`` sums of the selected rows
weighted by the activations, which read each row once and materialise nothing.
(``index_select`` would do the same job but is ~20x slower on fp32 CPU tensors in torch
2.13; measured in docs/performance.md.)  No dense mask is ever multiplied by zero."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import QuantRows, dense, rows_of
from .interface import Executor, FFNWeights, LinearWeights, PredictorWeights, TopKWeights, keep_topk, topk_indices


# Above this share of a matrix's rows a sparse op reads all rows densely instead of gathering:
# on the 2-core CPU gathering 50% of the rows is 3.5x slower than the dense FFN, and the sparse
# path starts to win between 60% and 70% sparsity (bench/results/cpu_ffn_sweep.json).
DENSE_SHARE = 0.35


class TorchExecutor(Executor):
    """Device-agnostic torch implementation; ``CpuExecutor`` and ``CannExecutor`` bind a device.
    Block-quantised weights (``QuantRows``) are de-quantised here, only the rows an op reads:
    correct on every device, and the reference for the kernels that read the blocks directly."""

    def linear(self, x, w: LinearWeights):
        return F.linear(x, dense(w.weight, x.dtype), w.bias)

    def ffn_dense(self, x, w: FFNWeights):
        h = w.act_fn(F.linear(x, dense(w.gate, x.dtype))) * F.linear(x, dense(w.up, x.dtype))
        if h.dim() == 2 and h.shape[0] == 1:
            # One token: a weighted sum of all down_t rows reads them in their stored order
            # (2x faster than h @ down_t, whose transposed GEMV is slow on CPU).
            return weighted_row_sum(w.down_t, torch.arange(h.shape[1], device=h.device), h)
        return h @ dense(w.down_t, h.dtype)

    def gate_rows(self, x, w: FFNWeights, idx):
        if idx.numel() > DENSE_SHARE * w.gate.shape[0]:
            return F.linear(x, dense(w.gate, x.dtype))[:, idx]
        return x @ rows_of(w.gate, idx, x.dtype).t()

    def up_down_rows(self, x, h, w: FFNWeights, idx):
        n_rows = w.up.shape[0]
        if idx.numel() > DENSE_SHARE * n_rows:
            # Many rows: reading all of them in order beats gathering (see docs/performance.md).
            full = torch.zeros(x.shape[0], n_rows, dtype=h.dtype, device=h.device)
            full[:, idx] = h
            coef = full * F.linear(x, dense(w.up, x.dtype))
            return weighted_row_sum(w.down_t, torch.arange(n_rows, device=x.device), coef)
        u = x @ rows_of(w.up, idx, x.dtype).t()
        return weighted_row_sum(w.down_t, idx, h * u)

    def topk_linear(self, x, w: TopKWeights, k=None):
        k = w.k if k is None else k
        if k >= w.weight_t.shape[0]:
            out = x @ dense(w.weight_t, x.dtype)
        elif x.shape[0] == 1:
            idx = topk_indices(x[0], k)
            out = weighted_row_sum(w.weight_t, idx, x[:, idx])
        else:
            out = keep_topk(x, k) @ dense(w.weight_t, x.dtype)   # batch > 1: each token its own K
        return out if w.bias is None else out + w.bias

    def lowrank_scores(self, x, p: PredictorWeights):
        return torch.addmm(p.bias, x @ p.a, p.b) if x.dim() == 2 else (x @ p.a) @ p.b + p.bias


def weighted_row_sum(weight, idx: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``coef [B, n] @ weight[idx]`` -> ``[B, d]``, reading each selected row once, in place."""
    bsz, n = coef.shape
    if n == 0:
        return coef.new_zeros(bsz, weight.shape[1])
    if isinstance(weight, QuantRows):
        return coef @ weight.rows(idx, coef.dtype)
    return F.embedding_bag(idx.expand(bsz, n), weight, per_sample_weights=coef.to(weight.dtype), mode="sum")
