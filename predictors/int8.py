"""Predictor factors on a per-row int8 grid.

The low-rank predictor only has to rank neurons against calibrated thresholds, so its factors
do not need 16 bits: calibration snaps each row of ``Aᵀ`` and ``Bᵀ`` (the rows the decode
kernels stream) onto a symmetric int8 grid, ``row = q · s`` with ``q`` in [-127, 127] and one
fp32 scale per row, *before* the thresholds are fitted, so the thresholds are calibrated for
exactly the predictor that runs.  Every backend computes with the same (dequantised) factors;
the cpu backend recognises the grid and streams the int8 rows, half the predictor's bytes."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _grid(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest int8 grid point of each entry, ``q [n, k]`` (float64, integral), and the row
    scales ``s [n]``: ``s = max|row| / 127``."""
    m = m.double()
    s = m.abs().amax(dim=1).clamp(min=1e-30) / 127
    return (m / s[:, None]).round().clamp(-127, 127), s


def snap_rows(m: torch.Tensor) -> torch.Tensor:
    """``m`` with each row replaced by its nearest point on that row's int8 grid."""
    q, s = _grid(m)
    return (q * s[:, None]).float()


def snap_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictor factors ``A [d, r]``, ``B [r, d_ff]`` snapped along the rows the kernels
    stream (the rows of Aᵀ and Bᵀ, i.e. the columns here)."""
    return snap_rows(a.T).T.contiguous(), snap_rows(b.T).T.contiguous()


@dataclass
class Int8Rows:
    q: torch.Tensor   # [n, k] int8
    s: torch.Tensor   # [n] fp32: row i = q[i] * s[i]


def int8_rows(m: torch.Tensor) -> Int8Rows | None:
    """``(q, s)`` when the rows of ``m`` lie on their int8 grids (as calibration leaves them,
    up to the rounding of a bf16 or fp16 copy, which may move an entry by one step), else None:
    off-grid factors are never quantised behind the caller's back."""
    m = m.double()
    q, s = _grid(m)
    # a 16-bit float copy moves each entry, and the row maximum the scale comes from, by at
    # most 2^-8 of itself (bf16; fp16 2^-11): allow 2^-7
    tol = m.abs() * 2.0**-7 + s[:, None] * 1e-6
    if bool(((q * s[:, None] - m).abs() > tol).any()):
        return None
    return Int8Rows(q.to(torch.int8), s.float())
