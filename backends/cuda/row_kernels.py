"""Triton gather kernels over weight rows of any format: float tensors and block-quantised
``formats.QuantRows`` (q8_0, q4_0, q4_1).  Each reads (and de-quantises, in registers) only the
rows it is given and accumulates in fp32:

* ``gate_up_act`` – ``act(x·gate[i]) * (x·up[i])`` for chosen neurons i; ``rows_dot`` the bare
                    ``x · W[idx[i]]`` (gate rows, and with every row the dense linear);
* ``rows_matvec`` – ``out[b] = Σ_j c[b, j] · W[idx[j]]``: the down projection over active
                    neurons (W = W_downᵀ) and the Top-K linear (W = Wᵀ).

A weight at column d of a row sits in block d // 32: its fp16 scale at the block's first two
bytes (q4_1: its fp16 minimum at the next two), q8_0's int8 at byte 2 + d % 32, q4_0/q4_1's
nibble in byte (header + d % 16), low half for d % 32 < 16.  The float row sum is
the one ``kernels.rows_matvec`` runs.  Tested under the interpreter (TRITON_INTERPRET=1)
against the de-quantising torch reference; the block formats never ran on a GPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import BLOCK_BYTES, rows_of

FORMAT_ID = {"q8_0": 0, "q4_0": 1, "q4_1": 2}
FLOAT = 3   # a float tensor: ROWB is then the row length in elements


@triton.jit
def _weights(w_ptr, rows, ds, mask, ROWB, FMT: tl.constexpr):
    """De-quantised fp32 weights W[rows[:, None], ds[None, :]] (``mask`` where valid)."""
    if FMT == 3:
        return tl.load(w_ptr + rows[:, None] * ROWB + ds[None, :], mask=mask, other=0.0).to(tl.float32)
    BB: tl.constexpr = 34 if FMT == 0 else (18 if FMT == 1 else 20)
    base = rows[:, None] * ROWB + (ds // 32)[None, :] * BB
    lo = tl.load(w_ptr + base, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(w_ptr + base + 1, mask=mask, other=0).to(tl.uint16)
    scale = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
    j = (ds % 32)[None, :]
    if FMT == 0:
        q = tl.load(w_ptr + base + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * scale
    else:
        HDR: tl.constexpr = 2 if FMT == 1 else 4
        byte = tl.load(w_ptr + base + HDR + (j % 16), mask=mask, other=0).to(tl.int32)
        nib = ((byte >> ((j // 16) * 4)) & 15).to(tl.float32)
        if FMT == 1:
            w = (nib - 8.0) * scale
        else:
            mlo = tl.load(w_ptr + base + 2, mask=mask, other=0).to(tl.uint16)
            mhi = tl.load(w_ptr + base + 3, mask=mask, other=0).to(tl.uint16)
            w = nib * scale + (mlo | (mhi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
    return tl.where(mask, w, 0.0)


@triton.jit
def _gate_up_act_kernel(x_ptr, gate_ptr, up_ptr, idx_ptr, h_ptr, B, D, N, ROWB, FMT: tl.constexpr,
                        HAS_UP: tl.constexpr, ACT: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = j < N
    rows = tl.load(idx_ptr + j, mask=jmask, other=0).to(tl.int64)
    bs = tl.arange(0, B_PAD)
    bmask = bs < B
    g = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        x = tl.load(x_ptr + bs[:, None] * D + ds[None, :], mask=bmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        wmask = jmask[:, None] & dmask[None, :]
        g += tl.sum(x[:, None, :] * _weights(gate_ptr, rows, ds, wmask, ROWB, FMT)[None, :, :], axis=2)
        if HAS_UP:
            u += tl.sum(x[:, None, :] * _weights(up_ptr, rows, ds, wmask, ROWB, FMT)[None, :, :], axis=2)
    if HAS_UP:
        if ACT == 0:
            a = tl.maximum(g, 0.0)
        else:
            a = g / (1.0 + tl.exp(-g))
        res = a * u
    else:
        res = g
    tl.store(h_ptr + bs[:, None] * N + j[None, :], res, mask=bmask[:, None] & jmask[None, :])


@triton.jit
def _rows_matvec_kernel(c_ptr, w_ptr, idx_ptr, out_ptr, B, N, D, ROWB, FMT: tl.constexpr, B_PAD: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    ds = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < D
    bs = tl.arange(0, B_PAD)
    bmask = bs < B
    acc = tl.zeros((B_PAD, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < N
        rows = tl.load(idx_ptr + j, mask=jmask, other=0).to(tl.int64)
        w = _weights(w_ptr, rows, ds, jmask[:, None] & dmask[None, :], ROWB, FMT)
        c = tl.load(c_ptr + bs[:, None] * N + j[None, :], mask=bmask[:, None] & jmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(c[:, :, None] * w[None, :, :], axis=1)
    tl.store(out_ptr + bs[:, None] * D + ds[None, :], acc, mask=bmask[:, None] & dmask[None, :])


# Launch configurations, one place for the launchers and the ahead-of-time compile check
# (aot.py).  Compiled for sm_87 and sm_90, BLOCK_N=32 x BLOCK_D=64 held 186-255 registers in
# the gate/up kernel from B_PAD=1 up and spilled at B_PAD=8; BLOCK_D=32 (one quantisation
# block per step) keeps it at <= 128 registers with no spill, and B_PAD=8 also halves BLOCK_N.
# Batches above MAX_BATCH (prefill) do not fit a register tile: they de-quantise the rows read
# and take one dense matmul instead (``_torch_*``).
MAX_BATCH = 8


def _b_pad(b: int) -> int:
    return max(1, triton.next_power_of_2(b))


def launch_config(kernel: str, b_pad: int) -> dict:
    """Block sizes and warps of ``kernel`` ("gate_up_act" | "rows_matvec") at a padded batch."""
    if kernel == "gate_up_act":
        return {"BLOCK_N": 16 if b_pad >= 8 else 32, "BLOCK_D": 32, "num_warps": 4}
    return {"BLOCK_N": 32, "BLOCK_D": 64, "num_warps": 4}


def _layout(w):
    """(data, row stride, format id) of a weight: bytes per row for blocks, elements for float."""
    if isinstance(w, torch.Tensor):
        return w, w.shape[1], FLOAT
    return w.data, w.cols // 32 * BLOCK_BYTES[w.fmt], FORMAT_ID[w.fmt]


def _rows(w, idx):
    return rows_of(w, idx.long(), torch.float32).float()


def _torch_gate_up_act(x, gate, up, idx, act):
    g = x.float() @ _rows(gate, idx).T
    if up is None:
        return g
    a = torch.relu(g) if act == "relu" else torch.nn.functional.silu(g)
    return a * (x.float() @ _rows(up, idx).T)


def gate_up_act(x: torch.Tensor, gate, up, idx: torch.Tensor, act: str = "relu") -> torch.Tensor:
    """``act(x @ gate[idx].T) * (x @ up[idx].T)`` -> fp32 ``[B, len(idx)]``; with ``up=None``
    just the gathered dot products ``x @ gate[idx].T``.  gate and up share one format."""
    bsz, d = x.shape
    n = idx.numel()
    if bsz > MAX_BATCH:
        return _torch_gate_up_act(x, gate, up, idx, act)
    h = torch.empty(bsz, n, dtype=torch.float32, device=x.device)
    if n == 0:
        return h
    data, rowb, fmt = _layout(gate)
    up_data = data if up is None else _layout(up)[0]
    cfg = launch_config("gate_up_act", _b_pad(bsz))
    # activations and indices in one dtype each (fp32, int64): the kernel reads them in fp32
    # anyway, and aot.py then compiles one variant per weight format instead of three
    _gate_up_act_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x.float().contiguous(), data, up_data, idx.long().contiguous(), h, bsz, d, n, rowb,
        FMT=fmt, HAS_UP=up is not None, ACT=0 if act == "relu" else 1, B_PAD=_b_pad(bsz), **cfg)
    return h


def rows_dot(x: torch.Tensor, w, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, D] @ W[idx].T`` -> fp32 ``[B, len(idx)]``."""
    return gate_up_act(x, w, None, idx)


def rows_matvec(c: torch.Tensor, w, idx: torch.Tensor) -> torch.Tensor:
    """``c [B, n] @ W[idx]`` -> fp32 ``[B, D]``, reading rows ``idx`` only."""
    bsz, n = c.shape
    d = w.shape[1]
    if bsz > MAX_BATCH:
        return c.float() @ _rows(w, idx)
    out = torch.zeros(bsz, d, dtype=torch.float32, device=c.device)
    if n == 0:
        return out
    data, rowb, fmt = _layout(w)
    cfg = launch_config("rows_matvec", _b_pad(bsz))
    _rows_matvec_kernel[(triton.cdiv(d, cfg["BLOCK_D"]),)](
        c.float().contiguous(), data, idx.long().contiguous(), out, bsz, n, d, rowb, FMT=fmt,
        B_PAD=_b_pad(bsz), **cfg)
    return out
