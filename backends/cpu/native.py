"""Build and call the native single-token kernels in ``csrc/`` (cpu backend): the
weight-streaming kernels in ``sparse_rows.c``, RMSNorm and attention in ``decode_ops.c``.

The C files are compiled once per machine with the system C compiler (``cc -O3
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

from edgesparse.cache import cache_dir

from ..formats import QuantRows, TransposedRows

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "sparse_rows.c", CSRC / "decode_ops.c", CSRC / "decode_layer.c"]
_state: dict = {}
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
# Block-quantised rows (formats.QuantRows): fp32 activations in and out, see quant_rows.h.
_QUANT = {"q8_0": "q8", "q4_0": "q4", "q4_1": "q41"}
# (gate/up, down) format pairs the fused FFN kernel is built for (quant_rows.h)
_FFN_PAIRS = ("q8_q8", "q4_q4", "q41_q41", "q4_q8", "q41_q8")
_QUANT_OPS = ("es_reglu_ffn", "es_weighted_rows", "es_gemv", "es_topk_linear")
_P, _I = ctypes.c_void_p, ctypes.c_int
# Declared argument types: ctypes then takes data_ptr() ints and None (NULL) as they are.
_SIGNATURES = {
    "es_reglu_ffn": [_P] * 11 + [_I] * 4 + [ctypes.c_float, _P, _P],
    "es_weighted_rows": [_P, _P, _P, _I, _I, _I, _P],
    "es_gemv": [_P, _P, _P, _I, _I, _I, _P],
    "es_topk_linear": [_P, _P, _I, _I, _I, _I, _P],
    "es_rms_norm": [_P, _P, ctypes.c_float, _I, _P],
    "es_decode_attention": [_P] * 5 + [_I] * 7 + [_P],
}
FMT_CODE = {"q8_0": 0, "q4_0": 1, "q4_1": 2}   # decode_layer.c's FMT_*
# Kernels over block rows only (one per block format).
_QUANT_ONLY_SIGNATURES = {"es_gemm": [_P, _P, _P, _I, _I, _I, _I, _P], "es_prompt_gemm": [_P, _P, _P, _I, _I, _I, _I, _P], "es_rows_gemm": [_P, _P, _I, _I, _I, _I, _P]}
# Kernels with one name for every format (the format is an argument: FMT_CODE).
_PLAIN_SIGNATURES = {"es_ffn_dense_q": [_I, _I, _I, _I, _P, _P, _P, _I, _I, _P, _I, _P],
                     "es_decode_layers": [_P, _I, _P, _P, _P, _P, _P, _I, _I, _I, _P],
                     "es_decode_layers_rows": [_P, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _P],
                     "es_swiglu": [_I, _P, _I, _I, _P],
                     "es_act_mul": [_P, _P, ctypes.c_int64, _I, _P]}


def cpu_features() -> str:
    """The CPU's feature flags as the kernel reports them (x86 ``flags``, ARM ``Features``),
    sorted; the model name where there are none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return " ".join(sorted(value.split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("EDGESPARSE_NATIVE", "1") == "0":
        return None, "disabled by EDGESPARSE_NATIVE=0"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler found (torch ops in use)"
    src = b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.[ch]")))   # any edit rebuilds
    # EDGESPARSE_NATIVE_SANITIZE=1 (the fuzz suite, tests/fuzz): built with AddressSanitizer and
    # UBSan, so a read past a buffer fails even where it would not crash; the process must have
    # libasan preloaded (LD_PRELOAD), which tests/fuzz/run.py arranges.
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                "-g"] if os.environ.get("EDGESPARSE_NATIVE_SANITIZE") == "1" else []
    # Keyed on the CPU's instruction-set features, not the host name: a cache dir carried to an
    # older CPU (a copied home or container image) rebuilds instead of dying of an illegal instruction.
    key = hashlib.sha256(src + platform.machine().encode() + cpu_features().encode()
                         + " ".join(sanitize).encode()).hexdigest()[:16]
    out = cache_dir() / f"sparse_rows-{key}{'-asan' if sanitize else ''}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", *sanitize, f"-I{CSRC}",
                   *map(str, SOURCES), "-o", str(tmp_so), "-lm"]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as e:   # $CC names no runnable compiler
                return None, f"C compiler {cc} cannot run ({e.strerror or e})"
            if r.returncode != 0:
                return None, f"native build failed: {(r.stderr.strip().splitlines() or ['?'])[0]}"
            os.replace(tmp_so, out)   # atomic: concurrent builders never see half a file
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as e:
        return None, f"native library not loadable: {e}"
    for name, argtypes in _SIGNATURES.items():
        quant = (_FFN_PAIRS if name == "es_reglu_ffn" else _QUANT.values()) if name in _QUANT_OPS else ()
        for suffix in (*_SUFFIX.values(), *quant):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None
    for name, argtypes in _QUANT_ONLY_SIGNATURES.items():
        for suffix in _QUANT.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None
    for name, argtypes in _PLAIN_SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    return lib, f"native kernels ({out.name})"


def lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        _state["lib"], _state["why"] = _build()
        if _state["lib"] is None and os.environ.get("EDGESPARSE_NATIVE", "1") != "0":
            # never silent: the torch fallback computes the same values several times slower
            import warnings
            warnings.warn(f"edgesparse: native cpu kernels unavailable ({_state['why']}); the cpu backend "
                          "runs its torch reference ops, several times slower", RuntimeWarning, stacklevel=2)
    return _state["lib"]


def status() -> str:
    lib()
    return _state["why"]


def variant() -> dict:
    """Which native build is in use: the instruction-set level its kernels use on this CPU
    (the build is ``-march=native``, so it is the best this CPU has), whether it came prebuilt
    (never, yet: it is compiled here on first use) and where it lives."""
    feats = set(cpu_features().split())
    level = ("avx512-vnni" if {"avx512f", "avx512_vnni"} <= feats else "avx2" if "avx2" in feats
             else "neon-dotprod" if "asimddp" in feats else "neon" if "asimd" in feats else "baseline")
    return dict(loaded=lib() is not None, isa=level, prebuilt=False, detail=status())


def supports(*tensors: torch.Tensor) -> bool:
    """True when the native kernels can run on these weights (cpu, bf16/fp32, contiguous).
    Called on every decode op, so written as plain attribute checks."""
    if lib() is None:
        return False
    dtype = tensors[0].dtype
    if dtype not in _SUFFIX:
        return False
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
            return False
    return True


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _fn(name: str, w: torch.Tensor):
    fns = _state.setdefault("fns", {})
    key = (name, w.dtype)
    if key not in fns:
        fns[key] = getattr(lib(), f"{name}_{_SUFFIX[w.dtype]}")
    return fns[key]


# Activations are passed in the weights' dtype and results come back in it (the C code works
# in fp32 inside and rounds like torch): no conversion ops around each call.  ``_act`` is a
# no-op for the tensors the cpu executor passes; a converted copy must be held in a local
# while C reads it.
def _act(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == w.dtype and x.is_contiguous() else x.to(w.dtype).contiguous()


def reglu_ffn(x: torch.Tensor, gate, up, down_t, a_t=None, b_t=None, bias=None, packed=None,
              threshold: float = 0.0) -> tuple[torch.Tensor, int, int]:
    """One token ``x [d]`` -> ``(out [d], candidates, active)``; see the C file.  The predictor
    is ``a_t [r, d]``, ``b_t [d_ff, r]`` and ``bias``; ``packed = (qa, sa, qb, sb)`` gives int8
    rows and scales used instead of ``a_t`` / ``b_t`` where not None.  No predictor: exact mode.
    A neuron is active where its gate > ``threshold`` (ReLU: 0; FATReLU: its t)."""
    f, d = gate.shape
    x, bias = _act(x, gate), None if bias is None else _act(bias, gate)   # held: C reads them
    qa, sa, qb, sb = packed or (None,) * 4
    r = qa.shape[0] if qa is not None else (0 if a_t is None else a_t.shape[0])
    out = torch.empty(d, dtype=gate.dtype)
    counts = (ctypes.c_int64 * 2)()
    _fn("es_reglu_ffn", gate)(x.data_ptr(), _ptr(a_t), _ptr(b_t), _ptr(qa), _ptr(sa), _ptr(qb), _ptr(sb), _ptr(bias),
                              gate.data_ptr(), up.data_ptr(), down_t.data_ptr(), d, r, f,
                              torch.get_num_threads(), float(threshold), out.data_ptr(), counts)
    return out, counts[0], counts[1]


def weighted_rows(w: torch.Tensor, idx: torch.Tensor | None, coef: torch.Tensor) -> torch.Tensor:
    """``coef [n] @ w[idx]`` -> ``[d_out]``, reading only the selected rows (idx None: all
    rows in order, ``coef [n_rows]``)."""
    idx = None if idx is None else idx.to(torch.int64).contiguous()
    coef = _act(coef, w)
    out = torch.empty(w.shape[1], dtype=w.dtype)
    _fn("es_weighted_rows", w)(w.data_ptr(), _ptr(idx), coef.data_ptr(), coef.numel(), w.shape[1],
                               torch.get_num_threads(), out.data_ptr())
    return out


def gemv(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``w [n, d] @ x [d] (+ bias)`` -> ``[n]`` in one streaming pass over ``w``."""
    x, bias = _act(x, w), None if bias is None else _act(bias, w)
    out = torch.empty(w.shape[0], dtype=w.dtype)
    _fn("es_gemv", w)(w.data_ptr(), x.data_ptr(), _ptr(bias),
                      w.shape[0], w.shape[1], torch.get_num_threads(), out.data_ptr())
    return out


def topk_linear(w_t: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest ``|x_j|`` of one token ``x [d_in]`` (ties to the lower index,
    like ``interface.topk_indices``) and return ``Σ_kept x_j · w_t[j]`` -> ``[d_out]``:
    selection and row sum in one native call."""
    x = _act(x, w_t)
    out = torch.empty(w_t.shape[1], dtype=w_t.dtype)
    _fn("es_topk_linear", w_t)(w_t.data_ptr(), x.data_ptr(), w_t.shape[0], w_t.shape[1], int(k),
                               torch.get_num_threads(), out.data_ptr())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of one row ``x [d]`` computed like transformers' (see the C file)."""
    x = _act(x, weight)
    out = torch.empty_like(weight)
    _fn("es_rms_norm", weight)(x.data_ptr(), weight.data_ptr(), eps, weight.numel(), out.data_ptr())
    return out


def decode_attention(qkv: torch.Tensor, cos, sin, cache_k, cache_v, slot: int, first: int, n_heads: int) -> torch.Tensor:
    """One token of one sequence: RoPE, cache write at ``slot``, attention over slots
    ``first..slot`` -> ``[n_heads * head_dim]`` (see ``Executor.decode_attention``)."""
    n_kv, max_len, hd = cache_k.shape
    qkv, cos, sin = _act(qkv, cache_k), _act(cos, cache_k), _act(sin, cache_k)
    out = torch.empty(n_heads * hd, dtype=cache_k.dtype)
    _fn("es_decode_attention", cache_k)(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), cache_k.data_ptr(),
                                        cache_v.data_ptr(), n_heads, n_kv, hd, max_len, slot, first,
                                        torch.get_num_threads(), out.data_ptr())
    return out


# -- block-quantised weights (QuantRows): activations go in and come out as fp32 ---------------
def supports_quant(*weights) -> bool:
    """True when every weight is a QuantRows on the cpu, contiguous, in a format with kernels."""
    if lib() is None:
        return False
    return all(type(w) is QuantRows and w.fmt in _QUANT and w.data.is_cpu and w.data.is_contiguous()
               for w in weights)


def supports_dense_ffn(gate, up, down_t) -> bool:
    """``q_ffn_dense`` runs these: gate and up alike, down neuron-major or TransposedRows."""
    down = down_t.stored if isinstance(down_t, TransposedRows) else down_t
    return supports_quant(gate, up, down) and gate.fmt == up.fmt


def supports_ffn(gate, up, down_t) -> bool:
    """The fused ReGLU kernel exists for these formats (gate and up alike; down paired)."""
    return (supports_quant(gate, up, down_t) and gate.fmt == up.fmt
            and f"{_QUANT[gate.fmt]}_{_QUANT[down_t.fmt]}" in _FFN_PAIRS)


def _qfn(name: str, w, down=None):
    """The kernel for ``w``'s format (the fused FFN: for its gate/up and ``down`` formats)."""
    fns = _state.setdefault("fns", {})
    key = (name, w.fmt, down and down.fmt)
    if key not in fns:
        fns[key] = getattr(lib(), f"{name}_{_QUANT[w.fmt]}" + (f"_{_QUANT[down.fmt]}" if down else ""))
    return fns[key]


def _f32(x: torch.Tensor | None):
    return None if x is None else x.to(torch.float32).contiguous()


def q_gemv(w, x: torch.Tensor, bias=None) -> torch.Tensor:
    """``w [n, d] @ x [d] (+ bias)`` for a QuantRows ``w``; fp32 ``[n]``."""
    x, bias = _f32(x), _f32(bias)
    n, d = w.shape
    out = torch.empty(n, dtype=torch.float32)
    _qfn("es_gemv", w)(w.data.data_ptr(), x.data_ptr(), _ptr(bias), n, d, torch.get_num_threads(), out.data_ptr())
    return out


def q_gemm(w, x: torch.Tensor, bias=None, prompt: bool = False) -> torch.Tensor:
    """``x [T, d] @ w.T (+ bias)`` for a QuantRows ``w [n, d]``; fp32 ``[T, n]``.  A batch of
    decode rows (``prompt=False``) gets each row equal to ``q_gemv`` of that token, to the bit;
    a prompt may take the repacked-tile kernel (``csrc/quant_gemm_tiles.h``), equal up to the
    order of fp32 sums over blocks."""
    x, bias = _f32(x), _f32(bias)
    n, d = w.shape
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    fn = _qfn("es_prompt_gemm" if prompt else "es_gemm", w)
    fn(w.data.data_ptr(), x.data_ptr(), _ptr(bias), n, d, x.shape[0], torch.get_num_threads(), out.data_ptr())
    return out


def q_rows_gemm(w, x: torch.Tensor) -> torch.Tensor:
    """``x [T, n] @ w`` for a QuantRows ``w [n, d_out]`` read as rows (neuron-major down
    projections and Top-K ``Wᵀ`` in prefill and batches); fp32 ``[T, d_out]``."""
    x = _f32(x)
    n, d_out = w.shape
    out = torch.empty(x.shape[0], d_out, dtype=torch.float32)
    _qfn("es_rows_gemm", w)(w.data.data_ptr(), x.data_ptr(), n, d_out, x.shape[0], torch.get_num_threads(),
                            out.data_ptr())
    return out


def q_weighted_rows(w, idx: torch.Tensor | None, coef: torch.Tensor) -> torch.Tensor:
    """``coef [n] @ w[idx]`` (idx None: all rows) for a QuantRows ``w``; fp32 ``[d_out]``."""
    idx = None if idx is None else idx.to(torch.int64).contiguous()
    coef = _f32(coef)
    out = torch.empty(w.cols, dtype=torch.float32)
    _qfn("es_weighted_rows", w)(w.data.data_ptr(), _ptr(idx), coef.data_ptr(), coef.numel(), w.cols,
                                torch.get_num_threads(), out.data_ptr())
    return out


def q_topk_linear(w_t, x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-K linear of one token (see ``topk_linear``) for a QuantRows ``w_t``; fp32 ``[d_out]``."""
    x = _f32(x)
    out = torch.empty(w_t.cols, dtype=torch.float32)
    _qfn("es_topk_linear", w_t)(w_t.data.data_ptr(), x.data_ptr(), w_t.shape[0], w_t.cols, int(k),
                                torch.get_num_threads(), out.data_ptr())
    return out


def q_reglu_ffn(x: torch.Tensor, gate, up, down_t, a_t=None, b_t=None, bias=None, packed=None,
                threshold: float = 0.0):
    """``reglu_ffn`` for QuantRows gate/up/down_t: ``(out fp32 [d], candidates, active)``."""
    f, d = gate.shape
    x, a_t, b_t, bias = _f32(x), _f32(a_t), _f32(b_t), _f32(bias)
    qa, sa, qb, sb = packed or (None,) * 4   # int8 rows, where given, are read instead of a_t / b_t
    r = qa.shape[0] if qa is not None else (0 if a_t is None else a_t.shape[0])
    out = torch.empty(d, dtype=torch.float32)
    counts = (ctypes.c_int64 * 2)()
    _qfn("es_reglu_ffn", gate, down_t)(x.data_ptr(), _ptr(a_t), _ptr(b_t), _ptr(qa), _ptr(sa), _ptr(qb), _ptr(sb),
                                       _ptr(bias), gate.data.data_ptr(), up.data.data_ptr(), down_t.data.data_ptr(),
                                       d, r, f, torch.get_num_threads(), float(threshold), out.data_ptr(), counts)
    return out, counts[0], counts[1]


def q_ffn_dense(x: torch.Tensor, gate, up, down_t, act: str) -> torch.Tensor:
    """Dense gated FFN of one token ``x [d]`` over QuantRows (``act``: relu or silu); fp32 ``[d]``.
    One native call (decode_layer.c), the one the native decoder layer makes too."""
    x = _f32(x)
    out = torch.empty(gate.cols, dtype=torch.float32)
    lib().es_ffn_dense_q(FMT_CODE[gate.fmt], FMT_CODE[down_t.fmt], int(act == "relu"),
                         int(isinstance(down_t, TransposedRows)), gate.data.data_ptr(), up.data.data_ptr(),
                         down_t.data.data_ptr(), gate.cols, gate.shape[0], x.data_ptr(), torch.get_num_threads(),
                         out.data_ptr())
    return out


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` of ``gu [B, 2f]`` (bf16 or fp32) with the roundings of the torch ops, in
    the code the native layer step runs (decode_layer.c): ``[B, f]`` in gu's dtype."""
    gu = gu.contiguous()
    n, f = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(n, f, dtype=gu.dtype)
    lib().es_swiglu(int(gu.dtype == torch.bfloat16), gu.data_ptr(), n, f, out.data_ptr())
    return out


def act_mul(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """``act(g) * u`` of fp32 ``g``, ``u`` as the fused single-token FFN computes it (decode_layer.c)."""
    g, u = g.float().contiguous(), u.float().contiguous()
    out = torch.empty_like(g)
    lib().es_act_mul(g.data_ptr(), u.data_ptr(), g.numel(), int(act == "relu"), out.data_ptr())
    return out
