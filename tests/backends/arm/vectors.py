"""Test vectors for the ARM check driver, made by the torch reference on x86.

The driver (``check_vectors.c``) reads the file, runs each kernel on the stored inputs and
compares with the stored outputs, in the native x86 build and in both aarch64 builds under
qemu: every architecture is held to the same vectors, and their expected values come from
the reference every fast path is tested against (``QuantRows.rows`` de-quantisation, the
interface's default ``rms_norm`` and ``decode_attention``, ``topk_indices``), not from the
C code.  The blocks themselves are made by the x86 quantiser (``formats.quantize_rows``).

File: b"ESVEC1", int32 count, then per record int32 kind, 8 int32 parameters, float32
tolerance, int32 number of arrays, and each array as int64 byte length + bytes."""
from __future__ import annotations

import struct
from pathlib import Path

import torch

from edgesparse.backends.formats import quantize_rows
from edgesparse.backends.interface import Executor, topk_indices

GEMV, ROWS, TOPK, RMS_F32, RMS_BF16, ATTN_F32, ATTN_BF16, REGLU, GEMV_BF16 = range(1, 10)
FMT = {"q8_0": 0, "q4_0": 1, "q4_1": 2}   # the driver's Q8 / Q4 / Q41


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class _Writer:
    def __init__(self):
        self.records: list[bytes] = []

    def add(self, kind: int, params: list[int], tol: float, *arrays: torch.Tensor) -> None:
        p = (list(params) + [0] * 8)[:8]
        out = struct.pack("<i8ifi", kind, *p, tol, len(arrays))
        for a in arrays:
            b = _raw(a)
            out += struct.pack("<q", len(b)) + b
        self.records.append(out)

    def save(self, path: Path) -> Path:
        path.write_bytes(b"ESVEC1" + struct.pack("<i", len(self.records)) + b"".join(self.records))
        return path


def make(path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = _Writer()
    for fmt, code in FMT.items():
        for n, d in ((1, 32), (7, 96), (37, 288)):
            q = quantize_rows(rnd(n, d) * 0.1, fmt)
            x = rnd(d)
            ref = q.rows(None, torch.float64)
            w.add(GEMV, [code, n, d], 2e-2, q.data, x, (ref @ x.double()).float())
            # row sums (down projections, Top-K): none, one, some and all rows
            coef = rnd(n)
            for idx in (torch.zeros(0, dtype=torch.int64), torch.tensor([n - 1]), torch.arange(0, n, 2),
                        torch.arange(n)):
                want = (coef[idx].double() @ ref[idx]) if idx.numel() else torch.zeros(d, dtype=torch.float64)
                w.add(ROWS, [code, n, d, idx.numel()], 2e-2, q.data, idx, coef[idx].contiguous(), want.float())
        for d_in, d_out, k in ((64, 96, 1), (64, 96, 40), (96, 32, 96), (288, 64, 77)):
            q = quantize_rows(rnd(d_in, d_out) * 0.1, fmt)   # Wᵀ: the rows of kept inputs
            x = rnd(d_in)
            idx = topk_indices(x, k)
            want = x[idx].double() @ q.rows(idx, torch.float64)
            w.add(TOPK, [code, d_in, d_out, k], 2e-2, q.data, x, want.float())
        if fmt != "q4_1":   # the ReGLU kernel pairs q8_0/q8_0 and q4_0/q4_0 here
            f, d = 96, 64
            gate, up, down = (quantize_rows(rnd(f, d) * 0.2, fmt) for _ in range(3))
            x = rnd(d)
            gx = gate.rows(None, torch.float64) @ x.double()
            h = torch.relu(gx) * (up.rows(None, torch.float64) @ x.double())
            w.add(REGLU, [code, f, d], 3e-2, gate.data, up.data, down.data, x, (h @ down.rows(None, torch.float64)).float())
    for n in (1, 100, 576):   # RMSNorm as transformers computes it (the interface default)
        x, wt = rnd(n) * 3, 1 + 0.2 * rnd(n)
        w.add(RMS_F32, [n], 1e-5, x, wt, Executor.rms_norm(None, x, wt, 1e-5))
        xb, wb = x.bfloat16(), wt.bfloat16()
        w.add(RMS_BF16, [n], 1e-2, xb, wb, Executor.rms_norm(None, xb, wb, 1e-5).float())
    for n_heads, n_kv, hd, slot, first in ((4, 2, 16, 5, 0), (6, 2, 32, 9, 3), (3, 3, 16, 0, 0)):
        max_len = 12
        for dtype, kind, tol in ((torch.float32, ATTN_F32, 1e-4), (torch.bfloat16, ATTN_BF16, 2e-2)):
            qkv = rnd((n_heads + 2 * n_kv) * hd).to(dtype)
            theta = torch.arange(hd // 2, dtype=torch.float64) * 0.3 + 0.1
            cos, sin = torch.cat([theta.cos()] * 2).to(dtype), torch.cat([theta.sin()] * 2).to(dtype)
            ck, cv = rnd(n_kv, max_len, hd).to(dtype), rnd(n_kv, max_len, hd).to(dtype)
            inputs = (qkv, cos, sin, ck.clone(), cv.clone())
            want = Executor.decode_attention(None, qkv, cos, sin, ck, cv, slot, first, n_heads)
            w.add(kind, [n_heads, n_kv, hd, max_len, slot, first], tol, *inputs, want.float(), ck.float())
    for n, d in ((5, 64), (33, 200)):   # bf16 float weights' GEMV
        wt, x = (rnd(n, d) * 0.1).bfloat16(), rnd(d).bfloat16()
        w.add(GEMV_BF16, [n, d], 1e-2, wt, x, (wt.double() @ x.double()).float())
    return w.save(path)
