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


# -- block-quantised rows: q8_0, q4_0 -------------------------------------------------------
# A row of d weights is d/32 blocks; each block is an fp16 scale (q4_1: and an fp16 minimum)
# then its quants (the GGUF Q8_0 / Q4_0 / Q4_1 block layouts, byte for byte), so a row is
# one contiguous byte stream and skipping rows never splits a block.  Matrices are stored
# with the axis the kernels stream as rows: FFN gate/up [d_ff, d], the down projection
# transposed [d_ff, d] (neuron-major), Top-K linears Wᵀ, dense linears W [d_out, d_in].
BLOCK = 32
BLOCK_BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2, "q4_1": 4 + BLOCK // 2}
BLOCK_FORMATS = tuple(BLOCK_BYTES)
FLOAT_FORMATS = ("fp32", "bf16", "fp16")
WEIGHT_FORMATS = FLOAT_FORMATS + BLOCK_FORMATS   # what --weights / weights= accept


def requantised_format(fmt: str | None) -> str | None:
    """The format for weights quantised a second time, across new axes (a 4-bit GGUF's down
    projection made neuron-major, LaRoSA-folded weights): 4 bits on top of 4 bits doubles
    the error (SmolLM2 Q4_1: 35% on the logits, broken answers), so those keep 8 bits."""
    return "q8_0" if fmt in ("q4_0", "q4_1") else fmt


@dataclass
class QuantRows:
    """A ``[n, cols]`` matrix as block-quantised rows: ``data`` is uint8 ``[n, cols/32 * block bytes]``."""
    fmt: str
    data: torch.Tensor
    cols: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.cols))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, idx: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
        """The selected rows (all when ``idx`` is None), de-quantised: the reference every
        quantised kernel is tested against."""
        data = self.data if idx is None else self.data[idx]
        n, nb = data.shape[0], self.cols // BLOCK
        blocks = data.view(n, nb, BLOCK_BYTES[self.fmt])
        scale = blocks[..., :2].contiguous().view(torch.float16).float()          # [n, nb, 1]
        if self.fmt == "q8_0":
            return (blocks[..., 2:].contiguous().view(torch.int8).float() * scale).view(n, self.cols).to(dtype)
        start = 4 if self.fmt == "q4_1" else 2
        packed = blocks[..., start:].to(torch.int16)
        q = torch.cat([packed & 15, packed >> 4], dim=-1).float()
        if self.fmt == "q4_1":   # w = s * n + min
            w = q * scale + blocks[..., 2:4].contiguous().view(torch.float16).float()
        else:                    # w = s * (n - 8)
            w = (q - 8) * scale
        return w.view(n, self.cols).to(dtype)

    # Read-only tensor-like views for code that inspects weights in float (calibration,
    # fingerprints, LaRoSA folding): always the de-quantised values.
    def float(self):
        return self.rows()

    def double(self):
        return self.rows(dtype=torch.float64)

    def to(self, *args, **kw):
        return self.rows().to(*args, **kw)

    def detach(self):
        return self.rows()


@dataclass
class TransposedRows(QuantRows):
    """A ``[n, m]`` matrix held as the block rows of its transpose (``data``: the ``[m, n]``
    matrix's rows, ``cols = n``).  The dense down projection of a SwiGLU FFN in this form is
    W_down itself, row-major with blocks along d_ff, as a GGUF file stores it: a dense GEMV of
    integer dots reads it in its own 4-bit blocks, where the neuron-major layout sparse FFNs
    need would re-quantise it (8 bits) and sum rows in fp32, the slower kernel.  Only a dense
    FFN reads it this way (cpu ``ffn_dense`` and the native layer); gathers of its logical rows
    go through ``rows``, which de-quantises the whole matrix (executors without the layout
    get a neuron-major copy at ``prepare_ffn``)."""

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.cols, self.data.shape[0]))

    @property
    def stored(self) -> QuantRows:
        """The transpose's block rows as a plain QuantRows (what the kernels stream)."""
        return QuantRows(self.fmt, self.data, self.cols)

    def rows(self, idx: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
        m = self.stored.rows(None, dtype).T
        return (m if idx is None else m[idx]).contiguous()


def quantizable(m, fmt: str | None) -> bool:
    return fmt in BLOCK_BYTES and m.dim() == 2 and m.shape[1] % BLOCK == 0


def quantize_rows(m: torch.Tensor, fmt: str, chunk: int = 4096) -> QuantRows:
    """Quantise the rows of ``m [n, cols]`` (cols a multiple of 32) to ``fmt``, ``chunk`` rows at
    a time so a large matrix never needs a second float copy.
    q8_0: scale = max|block| / 127, q = round(w / scale).
    q4_0: scale = -m / 8 with m the block's entry of largest magnitude (its sign kept), so m
    itself maps to the end of the range exactly; n = clamp(floor(w / scale + 8.5), 0, 15).
    q4_1: min = the block's minimum, scale = (max - min) / 15, n = round((w - min) / scale)."""
    if not quantizable(m, fmt):
        raise ValueError(f"cannot quantise a {tuple(m.shape)} matrix to {fmt}: rows must be multiples of {BLOCK}")
    n, cols = m.shape
    nb = cols // BLOCK
    out = torch.empty(n, nb * BLOCK_BYTES[fmt], dtype=torch.uint8)
    for i in range(0, n, chunk):
        blk = m[i:i + chunk].detach().to("cpu", torch.float32).view(-1, nb, BLOCK)
        if fmt == "q8_0":
            scale = blk.abs().amax(-1, keepdim=True) / 127
            inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
            q = (blk * inv).round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
        elif fmt == "q4_1":
            lo, hi = blk.amin(-1, keepdim=True), blk.amax(-1, keepdim=True)
            lo = lo.to(torch.float16).float()   # the stored min, so the grid starts exactly there
            scale = (hi - lo) / 15
            inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
            q = ((blk - lo) * inv).round().clamp(0, 15).to(torch.uint8)
            q = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
        else:
            pos = blk.abs().argmax(-1, keepdim=True)
            scale = blk.gather(-1, pos) / -8 + 0.0   # + 0.0: an all-zero block gets +0, not -0
            inv = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
            q = (blk * inv + 8.5).floor().clamp(0, 15).to(torch.uint8)
            q = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
        parts = [scale.to(torch.float16).view(torch.uint8)]                         # [rows, nb, 2]
        if fmt == "q4_1":
            parts.append(lo.to(torch.float16).view(torch.uint8))
        out[i:i + chunk] = torch.cat(parts + [q], dim=-1).view(-1, nb * BLOCK_BYTES[fmt])
    return QuantRows(fmt, out, cols)


def dense(w, dtype) -> torch.Tensor:
    """A weight as a float tensor of ``dtype`` (QuantRows de-quantised; tensors as they are)."""
    return w.rows(dtype=dtype) if isinstance(w, QuantRows) else w


def rows_of(w, idx: torch.Tensor, dtype) -> torch.Tensor:
    """Rows ``idx`` of a weight, as a float tensor of ``dtype``."""
    return w.rows(idx, dtype) if isinstance(w, QuantRows) else torch.nn.functional.embedding(idx, w)


def cat_rows(mats: list):
    """Stack matrices along their rows (fused q/k/v): QuantRows of one format stay blocks."""
    if all(isinstance(m, QuantRows) for m in mats) and len({(m.fmt, m.cols) for m in mats}) == 1:
        return QuantRows(mats[0].fmt, torch.cat([m.data for m in mats]), mats[0].cols)
    dtype = next((m.dtype for m in mats if not isinstance(m, QuantRows)), torch.float32)
    return torch.cat([dense(m, dtype) for m in mats])
