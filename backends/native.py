"""Build and call the native single-token kernels in ``csrc/sparse_rows.c`` (cpu backend).

The C file is compiled once per machine with the system C compiler (``cc -O3
-march=native -fopenmp``) into a cache dir and loaded with ctypes: no torch headers, a
one-second build, and code tuned for the CPU it runs on.  Anything missing (no compiler, a
failed build, ``EDGESPARSE_NATIVE=0``) leaves ``lib()`` None and the cpu backend falls back
to its torch ops, which compute the same thing; ``status()`` says which is in use."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "sparse_rows.c"
_state: dict = {}


def _cache_dir() -> Path:
    base = os.environ.get("EDGESPARSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgesparse")
    return Path(base)


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("EDGESPARSE_NATIVE", "1") == "0":
        return None, "disabled by EDGESPARSE_NATIVE=0"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler found (torch ops in use)"
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + platform.machine().encode() + platform.node().encode()).hexdigest()[:16]
    out = _cache_dir() / f"sparse_rows-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11",
                   str(SOURCE), "-o", str(tmp_so)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                return None, f"native build failed: {(r.stderr.strip().splitlines() or ['?'])[0]}"
            os.replace(tmp_so, out)   # atomic: concurrent builders never see half a file
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as e:
        return None, f"native library not loadable: {e}"
    for name in ("es_reglu_ffn_bf16", "es_reglu_ffn_f32", "es_weighted_rows_bf16", "es_weighted_rows_f32",
                 "es_gemv_bf16", "es_gemv_f32", "es_topk_linear_bf16", "es_topk_linear_f32"):
        getattr(lib, name).restype = None
    return lib, f"native kernels ({out.name})"


def lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        _state["lib"], _state["why"] = _build()
    return _state["lib"]


def status() -> str:
    lib()
    return _state["why"]


_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


def supports(*tensors: torch.Tensor) -> bool:
    """True when the native kernels can run on these weights (cpu, bf16/fp32, contiguous)."""
    t0 = tensors[0]
    return (lib() is not None and t0.dtype in _SUFFIX and
            all(t.device.type == "cpu" and t.dtype == t0.dtype and t.is_contiguous() for t in tensors))


def _p(t: torch.Tensor | None):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def reglu_ffn(x: torch.Tensor, gate, up, down_t, a_t=None, b_t=None, bias=None) -> tuple[torch.Tensor, int, int]:
    """One token ``x [d]`` -> ``(out [d] fp32, candidates, active)``; see the C file."""
    f, d = gate.shape
    r = 0 if a_t is None else a_t.shape[0]
    x = x.float().contiguous()
    out = torch.empty(d, dtype=torch.float32)
    t_buf = torch.empty(max(r, 1), dtype=torch.float32)
    counts = torch.zeros(2, dtype=torch.int64)
    bias = None if bias is None else bias.float().contiguous()   # held: C reads its memory
    fn = getattr(lib(), "es_reglu_ffn_" + _SUFFIX[gate.dtype])
    fn(_p(x), _p(a_t), _p(b_t), _p(bias),
       _p(gate), _p(up), _p(down_t), d, r, f, torch.get_num_threads(), _p(t_buf), _p(out), _p(counts))
    return out, int(counts[0]), int(counts[1])


def weighted_rows(w: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``coef [n] @ w[idx]`` -> ``[d_out]`` fp32, reading only the selected rows."""
    idx = idx.to(torch.int64).contiguous()
    coef = coef.float().contiguous()
    out = torch.empty(w.shape[1], dtype=torch.float32)
    fn = getattr(lib(), "es_weighted_rows_" + _SUFFIX[w.dtype])
    fn(_p(w), _p(idx), _p(coef), int(idx.numel()), int(w.shape[1]), torch.get_num_threads(), _p(out))
    return out


def gemv(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``w [n, d] @ x [d] (+ bias)`` -> ``[n]`` fp32 in one streaming pass over ``w``."""
    x = x.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    out = torch.empty(w.shape[0], dtype=torch.float32)
    fn = getattr(lib(), "es_gemv_" + _SUFFIX[w.dtype])
    fn(_p(w), _p(x), _p(bias), int(w.shape[0]), int(w.shape[1]), torch.get_num_threads(), _p(out))
    return out


def topk_linear(w_t: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest ``|x_j|`` of one token ``x [d_in]`` (ties to the lower index,
    like ``interface.topk_indices``) and return ``Σ_kept x_j · w_t[j]`` -> ``[d_out]`` fp32:
    selection and row sum in one native call."""
    x = x.float().contiguous()
    out = torch.empty(w_t.shape[1], dtype=torch.float32)
    fn = getattr(lib(), "es_topk_linear_" + _SUFFIX[w_t.dtype])
    fn(_p(w_t), _p(x), int(w_t.shape[0]), int(w_t.shape[1]), int(k), torch.get_num_threads(), _p(out))
    return out
