"""Triton kernels over block-quantised rows (``formats.QuantRows``: q8_0, q4_0, q4_1), the
gather ops of the cuda backend for those weights.  Each de-quantises only the blocks of the
rows it reads, in registers, and accumulates in fp32:

* ``rows_dot``    – ``out[b, i] = x[b] · W[idx[i]]``: gate / up rows of chosen neurons, and with
                    every row the dense linear;
* ``rows_matvec`` – ``out[b] = Σ_j c[b, j] · W[idx[j]]``: the down projection over active
                    neurons (W = W_downᵀ) and the Top-K linear (W = Wᵀ).

A weight at column d of a row sits in block d // 32: its fp16 scale at the block's first two
bytes (q4_1: its fp16 minimum at the next two), q8_0's int8 at byte 2 + d % 32, q4_0/q4_1's
nibble in byte (header + d % 16), low half for d % 32 < 16.  Tested under the interpreter
(TRITON_INTERPRET=1) against the de-quantising torch reference; not yet run on a GPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import BLOCK_BYTES

FORMAT_ID = {"q8_0": 0, "q4_0": 1, "q4_1": 2}


@triton.jit
def _weights(w_ptr, rows, ds, mask, ROWB, FMT: tl.constexpr):
    """De-quantised fp32 weights W[rows[:, None], ds[None, :]] (``mask`` where valid)."""
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
def _rows_dot_kernel(x_ptr, w_ptr, idx_ptr, out_ptr, B, D, N, ROWB, FMT: tl.constexpr, B_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = j < N
    rows = tl.load(idx_ptr + j, mask=jmask, other=0).to(tl.int64)
    bs = tl.arange(0, B_PAD)
    bmask = bs < B
    acc = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        x = tl.load(x_ptr + bs[:, None] * D + ds[None, :], mask=bmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        w = _weights(w_ptr, rows, ds, jmask[:, None] & dmask[None, :], ROWB, FMT)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(out_ptr + bs[:, None] * N + j[None, :], acc, mask=bmask[:, None] & jmask[None, :])


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


def _b_pad(b: int) -> int:
    return max(1, triton.next_power_of_2(b))


def rows_dot(x: torch.Tensor, w, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, D] @ W[idx].T`` -> fp32 ``[B, len(idx)]`` for a QuantRows ``W``."""
    bsz, d = x.shape
    n = idx.numel()
    out = torch.empty(bsz, n, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    _rows_dot_kernel[(triton.cdiv(n, 32),)](x.contiguous(), w.data, idx.contiguous(), out, bsz, d, n,
                                            d // 32 * BLOCK_BYTES[w.fmt], FMT=FORMAT_ID[w.fmt],
                                            B_PAD=_b_pad(bsz), BLOCK_N=32, BLOCK_D=64)
    return out


def rows_matvec(c: torch.Tensor, w, idx: torch.Tensor) -> torch.Tensor:
    """``c [B, n] @ W[idx]`` -> fp32 ``[B, D]`` for a QuantRows ``W``, reading rows ``idx`` only."""
    bsz, n = c.shape
    d = w.cols
    out = torch.zeros(bsz, d, dtype=torch.float32, device=c.device)
    if n == 0:
        return out
    _rows_matvec_kernel[(triton.cdiv(d, 64),)](c.contiguous(), w.data, idx.contiguous(), out, bsz, n, d,
                                               d // 32 * BLOCK_BYTES[w.fmt], FMT=FORMAT_ID[w.fmt],
                                               B_PAD=_b_pad(bsz), BLOCK_N=32, BLOCK_D=64)
    return out
