"""Predictor factors on a per-row int8 grid.

The low-rank predictor only has to rank neurons against calibrated thresholds, so its factors
do not need 16 bits: calibration snaps each row of ``Aᵀ`` and ``Bᵀ`` (the rows the decode
kernels stream) onto a symmetric int8 grid, ``row = q · s`` with ``q`` in [-127, 127] and one
fp32 scale per row, *before* the thresholds are fitted, so the thresholds are calibrated for
exactly the predictor that runs.  Every backend computes with the same (dequantised) factors.
The grid itself is a weight format (``backends/formats.py``): the cpu backend recognises it
and streams the int8 rows, half the predictor's bytes."""
from __future__ import annotations

import torch

from edgesparse.backends.formats import int8_grid


def snap_rows(m: torch.Tensor) -> torch.Tensor:
    """``m`` with each row replaced by its nearest point on that row's int8 grid."""
    q, s = int8_grid(m)
    return (q * s[:, None]).float()


def snap_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictor factors ``A [d, r]``, ``B [r, d_ff]`` snapped along the rows the kernels
    stream (the rows of Aᵀ and Bᵀ, i.e. the columns here)."""
    return snap_rows(a.T).T.contiguous(), snap_rows(b.T).T.contiguous()
