"""Typed weights of one decoder layer: an attention type and one MLP variant type.

The type says what a layer can run, so nothing checks string modes or ``None`` fields: a
dense ``Attention`` projects with plain linears and a ``TopKAttention`` with Top-K linears
(after LaRoSA, ``sparsity/larosa.py``); a ``GatedMLP`` runs densely, a ``ReGLUMLP`` also
exact and predictor-sparse, a ``TopKMLP`` (a SwiGLU after LaRoSA) dense or Top-K.  Each
MLP type lists its ``modes``; ``DecoderModel.set_ffn_mode`` checks against them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from edgesparse.backends.interface import FFNWeights, LinearWeights, PredictorWeights, TopKWeights
from edgesparse.sparsity.ffn import SparsityStats, reglu_forward, topk_mlp
from .spec import REGLU_ACTS


@dataclass
class Attention:
    norm: torch.Tensor
    qkv: LinearWeights       # q, k and v fused: one pass over the shared input
    o: LinearWeights
    adapter: ClassVar[None] = None   # no residual basis change without a rotation

    def project(self, ex, x, which: str, sparse: bool) -> torch.Tensor:
        return ex.linear(x, self.qkv if which == "qkv" else self.o)


@dataclass
class TopKAttention:
    norm: torch.Tensor
    qkv: TopKWeights
    o: TopKWeights
    adapter: LinearWeights | None = None   # residual basis change attention -> MLP (LaRoSA)

    def project(self, ex, x, which: str, sparse: bool) -> torch.Tensor:
        """Top-K of each token's input when ``sparse``, else the dense product (K = all)."""
        w = self.qkv if which == "qkv" else self.o
        out = ex.topk_linear(x.reshape(-1, x.shape[-1]), w, None if sparse else w.weight_t.shape[0])
        return out.view(*x.shape[:-1], out.shape[-1])


@dataclass
class GatedMLP:
    """A gated FFN (SwiGLU or ReGLU) run densely."""
    norm: torch.Tensor
    ffn: FFNWeights
    modes: ClassVar[tuple[str, ...]] = ("dense",)

    def run(self, ex, h: torch.Tensor, mode: str, stats: SparsityStats) -> torch.Tensor:
        """FFN of normed hidden states ``h [B, T, d]`` in ``mode`` (one of ``modes``)."""
        return _dense(ex, h, self.ffn)


@dataclass
class ReGLUMLP(GatedMLP):
    """A ReGLU FFN: dense, exact-sparse, or predictor-sparse once calibrated."""
    gate_linear: LinearWeights | None = None    # view of ffn.gate for the masked reference path
    predictor: PredictorWeights | None = None   # set by sparsity/svd_predictor.py
    # What this layer runs when the model runs "predictor": calibration's cost model keeps
    # the predictor only where it reads fewer bytes than exact mode or the dense FFN.
    calibrated_mode: str = "predictor"
    modes: ClassVar[tuple[str, ...]] = ("dense", "exact", "predictor")

    def effective_mode(self, mode: str) -> str:
        return self.calibrated_mode if mode == "predictor" else mode

    def run(self, ex, h, mode, stats):
        mode = self.effective_mode(mode)
        if mode == "dense":
            return _dense(ex, h, self.ffn)
        return reglu_forward(ex, h, self, mode, stats)


@dataclass
class TopKMLP:
    """A SwiGLU FFN under (rotated) Top-K: gate and up stacked, down transposed."""
    norm: torch.Tensor
    gate_up: TopKWeights
    down: TopKWeights
    modes: ClassVar[tuple[str, ...]] = ("dense", "topk")

    def run(self, ex, h, mode, stats):
        B, T, d = h.shape
        return topk_mlp(ex, h.reshape(B * T, d), self, mode == "topk").view(B, T, d)


@dataclass
class Layer:
    attn: Attention | TopKAttention
    mlp: GatedMLP | ReGLUMLP | TopKMLP
    adapter: LinearWeights | None = None   # residual basis change MLP -> next layer (LaRoSA)


def _dense(ex, h, ffn):
    B, T, d = h.shape   # executors take token rows [N, d] (one row: the decode kernels)
    return ex.ffn_dense(h.reshape(B * T, d), ffn).view(B, T, d)


def gated_mlp(ex, norm, gate, up, down, act: str, threshold: float = 0.0) -> GatedMLP:
    """The MLP type of a freshly loaded layer: ReGLU FFNs (ReLU, FATReLU) can run sparse,
    SwiGLU ones dense."""
    ffn = ex.prepare_ffn(gate, up, down, act, threshold)
    if act in REGLU_ACTS:
        return ReGLUMLP(norm, ffn, gate_linear=ex.prepare_linear(ffn.gate))
    return GatedMLP(norm, ffn)
