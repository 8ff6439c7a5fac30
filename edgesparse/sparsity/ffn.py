"""FFN execution modes, composed from executor operations.

* ``dense``     – all neurons.
* ``exact``     – ReGLU: the gate is computed densely, then up/down only for neurons whose
                  ReLU(gate) > 0.  Lossless: equals dense up to float rounding.
* ``predictor`` – ReGLU, two stages: low-rank scores ``(x·A)·B + b`` pick candidate neurons;
                  the gate is computed for candidates only; up/down only for candidates
                  whose ReLU(gate) > 0.  A false positive costs one gate row; only misses
                  (active neurons the predictor skipped) change the output.
* ``topk``      – SwiGLU under (LaRoSA-rotated) Top-K of the MLP inputs.

Decode (one token per row) uses the gather path.  Many tokens at once in a sparse mode
(evaluation) use the masked form of the same per-token arithmetic, which is the reference
the gather path is tested against.  The MLP weight types in ``models/weights.py`` call these."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgesparse.backends.formats import dense
from edgesparse.backends.interface import LinearWeights

FFN_MODES = ("dense", "exact", "predictor", "topk")


@dataclass
class SparsityStats:
    """Running counts over FFN evaluations, for `/stats`, the demo and `eval ppl`."""
    tokens: int = 0        # token-layer evaluations in a sparse mode
    neurons: int = 0       # d_ff * tokens
    gate_rows: int = 0     # gate rows computed (candidates; all neurons in exact mode)
    active_rows: int = 0   # up/down rows computed (predicted and truly active)
    true_active: int = 0   # neurons with gate > 0 (known only on the reference path)
    missed: int = 0        # truly active neurons the predictor skipped (reference path)

    def reset(self):
        self.__init__()

    def summary(self) -> dict:
        if not self.neurons:   # nothing decoded in a sparse mode: nothing skipped
            return {"gate_sparsity": 0.0, "ffn_sparsity": 0.0}
        n = self.neurons
        # Counts may be 0-d device tensors (the cuda backend does not sync for them): float().
        out = {"gate_sparsity": 1 - float(self.gate_rows) / n, "ffn_sparsity": 1 - float(self.active_rows) / n}
        if self.true_active:
            out["natural_sparsity"] = 1 - self.true_active / n
            out["predictor_recall"] = 1 - self.missed / self.true_active
        return out


class StatsBook:
    """Per-layer SparsityStats with an aggregate summary."""

    def __init__(self):
        self.layers: dict[int, SparsityStats] = {}

    def layer(self, i: int) -> SparsityStats:
        return self.layers.setdefault(i, SparsityStats())

    def reset(self):
        self.layers.clear()

    def total(self) -> SparsityStats:
        out = SparsityStats()
        for st in self.layers.values():
            for k in vars(out):
                setattr(out, k, getattr(out, k) + getattr(st, k))
        return out

    def summary(self) -> dict:
        return self.total().summary()

    def per_layer(self) -> list[dict]:
        return [dict(layer=i, **self.layers[i].summary()) for i in sorted(self.layers) if self.layers[i].neurons]


def reglu_forward(ex, h: torch.Tensor, mlp, mode: str, stats: SparsityStats) -> torch.Tensor:
    """ReGLU FFN of ``h [B, T, d]`` in a sparse ``mode`` (exact or predictor): the gather path
    for a decode step (one token per row), the masked reference form of the same arithmetic
    for several tokens per row."""
    B, T, d = h.shape
    x = h.reshape(B * T, d)
    out = (_gather_path if T == 1 else _masked_path)(ex, x, mlp, mode, stats)
    return out.view(B, T, d)


def topk_mlp(ex, x, mlp, sparse: bool):
    """SwiGLU under (rotated) Top-K: gate and up stacked in one Top-K linear, then down."""
    full = None if sparse else mlp.gate_up.weight_t.shape[0]
    gu = ex.topk_linear(x, mlp.gate_up, full)
    h = ex.swiglu_stacked(gu)
    return ex.topk_linear(h, mlp.down, None if sparse else h.shape[-1])


def _gather_path(ex, x, mlp, mode, stats):
    w = mlp.ffn
    out, gate_rows, active = ex.reglu_sparse(x, w, None if mode == "exact" else mlp.predictor)
    record_gather(stats, x.shape[0], w.gate.shape[0], gate_rows, active)
    return out


def record_gather(stats: SparsityStats, n_tok: int, d_ff: int, gate_rows, active) -> None:
    """Counts of a gather-path FFN (rows per token, as ``Executor.reglu_sparse`` returns them)."""
    stats.tokens += n_tok
    stats.neurons += n_tok * d_ff
    stats.gate_rows += n_tok * gate_rows
    stats.active_rows += n_tok * active


def _masked_path(ex, x, mlp, mode, stats):
    """Per-token sparsity on many tokens at once, as dense ops with masks (reference)."""
    w = mlp.ffn
    g = ex.linear(x, mlp.gate_linear)
    true_active = g > w.threshold   # ReLU: > 0; FATReLU: > t
    if mode == "exact":
        cand = torch.ones_like(true_active)
    else:
        cand = ex.lowrank_scores(x, mlp.predictor) > 0
    h = w.act_fn(g) * cand
    out = (h * ex.linear(x, LinearWeights(w.up))) @ dense(w.down_t, h.dtype)
    stats.tokens += x.shape[0]
    stats.neurons += true_active.numel()
    stats.gate_rows += int(cand.sum())
    stats.active_rows += int((true_active & cand).sum())
    stats.true_active += int(true_active.sum())
    stats.missed += int((true_active & ~cand).sum())
    return out
