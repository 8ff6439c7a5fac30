"""``edgesparse bench ffn``: one FFN layer, dense vs predictor-sparse vs exact-sparse.

Weights are random but the active set is controlled: gate rows are sign-flipped so that
exactly the chosen share of neurons has gate > 0 for the benchmark input, and the predictor's
bias admits those neurons plus a share of false positives, like a calibrated predictor.
Runs are interleaved (dense, sparse, exact, dense, ...) and medians reported, so drift of a
shared machine hits all three alike."""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from edgesparse.backends import get_executor
from edgesparse.backends.formats import BLOCK, BLOCK_BYTES, QuantRows
from edgesparse.backends.interface import FFNWeights
from edgesparse.predictors.int8 import snap_factors
from ..errors import InvalidOptionError
from ..models.weights import ReGLUMLP
from ..sparsity.ffn import SparsityStats
from ..loader import DTYPES


def parse_shape(s: str) -> tuple[int, int]:
    try:
        d, f = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise InvalidOptionError(f"--shape must look like 4096x11008, got {s!r}") from None
    if d < 8 or f < 8:
        raise InvalidOptionError(f"--shape dimensions must be >= 8, got {s}")
    return d, f


# Datasheet peak memory bandwidth (GB/s) of GPUs the cuda backend targets, for "% of peak".
PEAK_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039,
            "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "Orin": 204.8, "L4": 300, "RTX 4090": 1008}


def read_bandwidth_gbs(ex, mib: int = 1024, repeats: int = 5) -> float:
    """Stream-like read bandwidth on the executor's device: a reduction over a buffer far
    larger than the caches, placed by the executor like weights (on cpu: huge pages, which
    read ~15% faster than 4 KB pages here, so the floor is the stricter one)."""
    buf = ex.place(torch.ones(mib * 2**20 // 4, dtype=torch.float32))
    buf.sum()
    times = []
    for _ in range(repeats):
        ex.synchronize()
        t0 = time.perf_counter()
        buf.sum()
        ex.synchronize()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / min(times) / 1e9


def peak_gbs(ex) -> float | None:
    name = ex.device_name()
    if name is None:
        return None
    return next((v for k, v in PEAK_GBS.items() if k in name), None)


def synthetic_layer(ex, d, f, sparsity, dtype, rank, false_pos=0.1, seed=0, int8_predictor=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, d, generator=g)
    gate = torch.randn(f, d, generator=g) / d**0.5
    n_active = max(1, round((1 - sparsity) * f))
    active = torch.zeros(f, dtype=torch.bool)
    active[torch.randperm(f, generator=g)[:n_active]] = True
    sign = torch.where((gate @ x[0] > 0) == active, 1.0, -1.0)
    gate = gate * sign[:, None]
    up = torch.randn(f, d, generator=g) / d**0.5
    down = torch.randn(d, f, generator=g) / f**0.5
    a, b = torch.randn(d, rank, generator=g) / d**0.5, torch.randn(rank, f, generator=g) / rank**0.5
    if int8_predictor:   # factors on per-row int8 grids, as `calibrate` leaves them by default
        a, b = snap_factors(a, b)
    ffn = ex.prepare_ffn(gate.to(dtype), up.to(dtype), down.to(dtype), "relu")
    if isinstance(ffn.gate, QuantRows):   # rounding may flip gates near 0: take the stored ones
        active = (x[0] @ ffn.gate.rows().T) > 0
        n_active = int(active.sum())
    cand = active.clone()
    extra = (~active).nonzero().flatten()
    cand[extra[torch.randperm(extra.numel(), generator=g)[:round(false_pos * n_active)]]] = True
    scores = (x @ a @ b)[0]
    bias = -scores + torch.where(cand, 1.0, -1.0)
    norm = torch.ones(d, dtype=dtype)   # the benchmark feeds the FFN directly: no norm
    layer = ReGLUMLP(norm, ffn, ex.prepare_linear(ffn.gate), ex.prepare_predictor(a.to(dtype), b.to(dtype), bias.to(dtype)))
    return layer, ex.place(x.to(dtype)).view(1, 1, d), int(cand.sum()), n_active


def _copy_layer(ex, layer):
    # Through the executor, so each copy gets the same memory treatment as loaded weights.
    f, p = layer.ffn, layer.predictor
    def copy(m):
        if isinstance(m, QuantRows):
            return replace(m, data=ex.place(m.data.clone()))
        return ex.place(m.clone())
    ffn = FFNWeights(copy(f.gate), copy(f.up), copy(f.down_t), f.act, f.threshold)
    return ReGLUMLP(layer.norm, ffn, ex.prepare_linear(ffn.gate), ex.prepare_predictor(p.a.clone(), p.b.clone(), p.bias.clone()))


def bench_ffn(shape="4096x11008", sparsity=0.9, dtype="fp32", backend="cpu", rank=None, repeats=15,
              false_pos=0.1, executor=None, bandwidth_mib: int = 1024, copies: int = 4,
              int8_predictor: bool = True, weights: str | None = None) -> dict:
    d, f = parse_shape(shape)
    if not 0 <= sparsity < 1:
        raise InvalidOptionError(f"--sparsity must be in [0, 1), got {sparsity}")
    if dtype not in DTYPES:
        raise InvalidOptionError(f"--dtype must be fp32 or bf16, got {dtype}")
    tdtype = DTYPES[dtype]
    if weights not in (None, *BLOCK_BYTES):
        raise InvalidOptionError(f"--weights must be one of {', '.join(BLOCK_BYTES)}, got {weights}")
    ex = executor or get_executor(backend)
    ex.weight_format = weights
    rank = rank or max(32, d // 8)
    layer, x, n_cand, n_active = synthetic_layer(ex, d, f, sparsity, tdtype, rank, false_pos,
                                                 int8_predictor=int8_predictor)
    # Decode streams every layer's weights from memory once per token.  Timing one layer over
    # and over would leave its sparse working set (~40 MB at 7B / 90%) partly in the caches,
    # so the runs rotate through copies of the layer that together far exceed the caches.
    layers = [layer] + [_copy_layer(ex, layer) for _ in range(copies - 1)]
    turn = iter(range(10**9))
    stats = SparsityStats()

    def run(mode):
        return lambda: layers[next(turn) % copies].run(ex, x, mode, stats)
    runs = {"dense": run("dense"), "sparse": run("predictor"), "exact": run("exact")}
    with torch.inference_mode():
        ref = runs["dense"]()
        for name in ("sparse", "exact"):
            if not torch.allclose(runs[name]().float(), ref.float(), atol=1e-2, rtol=1e-2):
                raise RuntimeError(f"{name} FFN output differs from dense: benchmark setup is wrong")
        times = {k: [] for k in runs}
        for _ in range(3):
            for fn in runs.values():
                fn()
        for _ in range(repeats):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                ex.synchronize()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    esize = torch.tensor([], dtype=tdtype).element_size()
    pk = layer.predictor.packed or (None,) * 4   # factors the executor streams as int8 rows + fp32 scales
    a_i8, b_i8 = pk[0] is not None, pk[2] is not None
    packed = a_i8 and b_i8
    predictor_bytes = rank * d * (1 if a_i8 else esize) + rank * f * (1 if b_i8 else esize) + 4 * (rank * a_i8 + f * b_i8)
    row_bytes = esize * d if weights is None else d // BLOCK * BLOCK_BYTES[weights]
    touched = predictor_bytes + esize * f + row_bytes * (n_cand + 2 * n_active)
    bw = read_bandwidth_gbs(ex, bandwidth_mib)
    peak = peak_gbs(ex)
    floor_ms = touched / (bw * 1e9) * 1e3
    dense_bytes = 3 * f * row_bytes
    return dict(shape=f"{d}x{f}", dtype=dtype, weights=weights or dtype, backend=ex.name, sparsity=sparsity, rank=rank, layer_copies=copies,
                predictor="int8 rows" if packed else "float", predictor_bytes=predictor_bytes,
                threads=torch.get_num_threads(), candidates=n_cand, active=n_active, repeats=repeats,
                dense_ms=round(med["dense"], 4), sparse_ms=round(med["sparse"], 4), exact_ms=round(med["exact"], 4),
                speedup=round(med["dense"] / med["sparse"], 3), exact_speedup=round(med["dense"] / med["exact"], 3),
                touched_bytes=touched, dense_bytes=dense_bytes, bandwidth_gbs=round(bw, 2),
                floor_ms=round(floor_ms, 4), dense_floor_ms=round(dense_bytes / (bw * 1e9) * 1e3, 4),
                efficiency=round(floor_ms / med["sparse"], 3),
                dense_efficiency=round(dense_bytes / (bw * 1e9) * 1e3 / med["dense"], 3),
                sparse_gbs=round(touched / med["sparse"] / 1e6, 2), dense_gbs=round(dense_bytes / med["dense"] / 1e6, 2),
                peak_gbs=peak, sparse_pct_of_peak=None if peak is None else round(
                    100 * touched / med["sparse"] / 1e6 / peak, 1))
