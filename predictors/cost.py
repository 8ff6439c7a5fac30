"""Bytes a ReGLU FFN reads per decoded token, per way of running it: the cost model that
picks each layer's predictor rank, or exact mode, or the dense FFN, at calibration.

Decode is bound by the bytes it streams, and not all bytes stream alike: rows gathered by
index run slower than a matrix read end to end (the cpu kernels measured 55-62% against 78%
of the copy bandwidth on the 4096x11008 shape, docs/performance.md), so gathered bytes count
``GATHER_COST`` times.  A predictor of rank r reads its int8 factors (r rows of Aᵀ, d_ff rows
of Bᵀ, one fp32 scale per row) in full, then the gate rows of its candidates, then up and down
rows where the gate is truly active among them."""
from __future__ import annotations

from dataclasses import dataclass

GATHER_COST = 0.78 / 0.585   # a gathered byte against a streamed one (the measured bandwidths above)


@dataclass(frozen=True)
class FFNShape:
    d: int
    d_ff: int
    gate_row: float   # bytes of one gate row (the weight format's: bf16 2d, q4_0 18d/32, ...)
    up_row: float
    down_row: float   # one neuron's row of W_downᵀ
    factor_bytes: float = 1.0   # per predictor entry: int8 rows (float factors: their dtype's size)

    def predictor_bytes(self, rank: int) -> float:
        return rank * (self.d + self.d_ff) * self.factor_bytes + 4 * (rank + self.d_ff)

    def dense(self) -> float:
        return self.d_ff * (self.gate_row + self.up_row + self.down_row)

    def exact(self, active: float) -> float:
        """The whole gate streamed, up/down gathered for the ``active`` share of neurons."""
        return self.d_ff * (self.gate_row + GATHER_COST * active * (self.up_row + self.down_row))

    def predictor(self, rank: int, candidates: float, active: float) -> float:
        """``candidates``: predicted share of neurons (1 - gate skip); ``active``: share both
        predicted and truly active (recall x natural activity)."""
        return self.predictor_bytes(rank) + self.d_ff * GATHER_COST * (
            candidates * self.gate_row + active * (self.up_row + self.down_row))


def rank_grid(d: int, d_ff: int, largest: int = 1024) -> list[int]:
    """Ranks to try: d/16 .. d/2 (the published 7B ranks, 256-512, are d/16-d/8), at least 16,
    at most ``largest`` (a larger SVD costs more at calibration than it can save)."""
    cap = min(d, d_ff, largest)
    return sorted({min(cap, max(16, round(d * f))) for f in (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2)})
