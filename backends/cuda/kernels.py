"""Triton kernels of the cuda backend.  All accumulate in fp32 whatever the weight dtype.

* ``score_compact``  – predictor scores ``t @ B + bias`` (t = x @ A, tiny) thresholded at 0
                       and compacted into a list of candidate neurons (block-local prefix
                       sum + one atomic per block; the list is unordered across blocks).
* ``gate_up_act``    – for a list of neurons, ``relu(gate[i]·x) * (up[i]·x)`` for every row
                       of x: one pass over each selected gate/up row, all batch rows at once.
* ``rows_matvec``    – ``out[b] = Σ_j c[b, j] · W[idx[j], :]``: the down projection over
                       active neurons (W = W_downᵀ) and the Top-K linear (W = Wᵀ): each
                       selected row is read once, contiguously.

* ``reglu_ffn``      – the whole ReGLU FFN of one token with no host synchronisation and
                       fixed shapes (graph-capturable): candidates are compacted into a
                       buffer of capacity d_ff with the count kept on the device; the gate/up
                       and down kernels read that count and mask everything past it, and
                       skip (masked loads, no memory traffic) the up/down rows of neurons
                       whose ReLU(gate) is 0.

Under ``TRITON_INTERPRET=1`` these run on the CPU, which is how CI tests them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .row_kernels import gate_up_act, rows_matvec  # noqa: F401  (gather kernels shared with the block formats)

# Block sizes of the single-token ReGLU kernels, shared with the ahead-of-time compile check
# (aot.py), which compiles exactly these for sm_87 and sm_90 (all three fit without spilling).
SCORE = {"BLOCK_R": 32, "BLOCK_F": 128}
GATE_UP = {"BLOCK_N": 32, "BLOCK_D": 64}
DOWN = {"BLOCK_N": 32, "BLOCK_D": 64}


@triton.jit
def _score_compact_kernel(t_ptr, b_ptr, bias_ptr, out_idx_ptr, count_ptr, R, F,
                          BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < R
        t = tl.load(t_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        w = tl.load(b_ptr + rows[:, None] * F + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(t[:, None] * w, axis=0)
    acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    hit = (acc > 0) & cmask
    hit_i = hit.to(tl.int32)
    n = tl.sum(hit_i, axis=0)
    base = tl.atomic_add(count_ptr, n)
    slot = base + tl.cumsum(hit_i, axis=0) - 1
    tl.store(out_idx_ptr + slot, cols, mask=hit)


@triton.jit
def _reglu_gate_up_kernel(x_ptr, gate_ptr, up_ptr, idx_ptr, count_ptr, h_ptr, active_ptr, D,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.load(count_ptr)
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = j < n
    rows = tl.load(idx_ptr + j, mask=jmask, other=0).to(tl.int64)
    g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        x = tl.load(x_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(gate_ptr + rows[:, None] * D + ds[None, :], mask=jmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        g += tl.sum(w * x[None, :], axis=1)
    act = jmask & (g > 0)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):   # up rows of inactive neurons are never loaded
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        x = tl.load(x_ptr + ds, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(up_ptr + rows[:, None] * D + ds[None, :], mask=act[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        u += tl.sum(w * x[None, :], axis=1)
    tl.store(h_ptr + j, tl.where(act, g * u, 0.0), mask=jmask)
    tl.atomic_add(active_ptr, tl.sum(act.to(tl.int32), axis=0))


@triton.jit
def _rows_matvec_count_kernel(c_ptr, w_ptr, idx_ptr, count_ptr, out_ptr, D,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.load(count_ptr)
    ds = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, n, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < n
        c = tl.load(c_ptr + j, mask=jmask, other=0.0)
        rows = tl.load(idx_ptr + j, mask=jmask, other=0).to(tl.int64)
        live = jmask & (c != 0.0)     # rows of inactive candidates are never loaded
        w = tl.load(w_ptr + rows[:, None] * D + ds[None, :], mask=live[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(c[:, None] * w, axis=0)
    tl.store(out_ptr + ds, acc, mask=dmask)


def reglu_ffn(x, gate, up, down_t, t=None, b=None, bias=None):
    """ReGLU FFN of one token ``x [1, d]`` over predicted neurons (``t = x @ A`` with ``b``,
    ``bias``) or, with ``t=None``, over all neurons with a dense gate.  Returns
    ``(out [1, d] fp32, candidates, active)``, the counts as device tensors: nothing here
    waits for the GPU, and every shape is fixed, so a CUDA graph can capture it."""
    f, d = gate.shape
    dev = gate.device
    counts = torch.zeros(2, dtype=torch.int32, device=dev)
    if t is None:
        idx = torch.arange(f, dtype=torch.int32, device=dev)
        counts[0] = f
    else:
        idx = torch.empty(f, dtype=torch.int32, device=dev)
        _score(t, b, bias, idx, counts)
    h = torch.empty(f, dtype=torch.float32, device=dev)
    # the kernels read activations as fp32 whatever the model dtype: one compiled variant each
    xc = x.float().contiguous()
    _reglu_gate_up_kernel[(triton.cdiv(f, GATE_UP["BLOCK_N"]),)](xc, gate, up, idx, counts, h, counts[1:], d,
                                                                 **GATE_UP)
    out = torch.empty(1, d, dtype=torch.float32, device=dev)
    _rows_matvec_count_kernel[(triton.cdiv(d, DOWN["BLOCK_D"]),)](h, down_t, idx, counts, out, d, **DOWN)
    return out, counts[0], counts[1]


def _score(t, b, bias, out_idx, count):
    r, f = b.shape
    _score_compact_kernel[(triton.cdiv(f, SCORE["BLOCK_F"]),)](t.float().contiguous(), b, bias, out_idx, count, r, f,
                                                               **SCORE)


def score_compact(t: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Indices (int32, unordered) of neurons with ``t @ b + bias > 0`` for one token ``t [r]``."""
    f = b.shape[1]
    out = torch.empty(f, dtype=torch.int32, device=b.device)
    count = torch.zeros(1, dtype=torch.int32, device=b.device)
    _score(t, b, bias, out, count)
    return out[:int(count.item())]
