"""Weight formats the executors stream, defined once for every backend and for calibration.

``int8 rows``: each row ``= q · s`` with ``q`` in [-127, 127] and one fp32 scale per row (the
grid calibration snaps the predictor factors onto, and the rows the cpu kernels stream)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def int8_grid(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest int8 grid point of each entry of ``m [n, k]``, ``q`` (float64, integral), and the
    row scales ``s [n]``: ``s = max|row| / 127``."""
    m = m.double()
    s = m.abs().amax(dim=1).clamp(min=1e-30) / 127
    return (m / s[:, None]).round().clamp(-127, 127), s


@dataclass
class Int8Rows:
    q: torch.Tensor   # [n, k] int8
    s: torch.Tensor   # [n] fp32: row i = q[i] * s[i]


def int8_rows(m: torch.Tensor) -> Int8Rows | None:
    """``(q, s)`` when the rows of ``m`` lie on their int8 grids (as calibration leaves them,
    up to the rounding of a bf16 or fp16 copy, which may move an entry by one step), else None:
    off-grid factors are never quantised behind the caller's back."""
    m = m.double()
    q, s = int8_grid(m)
    # a 16-bit float copy moves each entry, and the row maximum the scale comes from, by at
    # most 2^-8 of itself (bf16; fp16 2^-11): allow 2^-7
    tol = m.abs() * 2.0**-7 + s[:, None] * 1e-6
    if bool(((q * s[:, None] - m).abs() > tol).any()):
        return None
    return Int8Rows(q.to(torch.int8), s.float())
