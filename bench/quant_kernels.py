"""The cpu backend's block-quantised kernels one at a time: GEMV (integer dots), row sums (the
neuron-major down projection), Top-K linears and the dense FFN, at SmolLM2's shapes (in cache),
the TinyLlama shape's down projection and Top-K qkv, and one 37 MB matrix (streamed from memory).  Medians of repeated calls, with the measured read bandwidth.

    python bench/quant_kernels.py [--out bench/results/quant_kernels.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from edgesparse.backends import get_executor
from edgesparse.backends.cpu import native
from edgesparse.backends.formats import TransposedRows, quantize_rows
from edgesparse.benchmarks.ffn import read_bandwidth_gbs


def _median_us(fn, n):
    for _ in range(5):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for fmt in ("q4_0", "q4_1", "q8_0"):
        for n, d in ((1536, 576), (576, 1536), (49152, 576), (32768, 2048)):
            w, x = quantize_rows(torch.randn(n, d), fmt), torch.randn(d)
            us = _median_us(lambda: native.q_gemv(w, x), 50 if n > 30000 else 300)
            rows.append(dict(kernel="gemv", fmt=fmt, shape=[n, d], us=round(us, 1), gbs=round(w.nbytes / us / 1e3, 1)))
        w, h = quantize_rows(torch.randn(1536, 576), fmt), torch.randn(1536)
        us = _median_us(lambda: native.q_weighted_rows(w, None, h), 300)
        rows.append(dict(kernel="row_sums", fmt=fmt, shape=[1536, 576], us=round(us, 1),
                         gbs=round(w.nbytes / us / 1e3, 1)))
        # the TinyLlama shape's neuron-major down projection and Top-K qkv (W^T, 1378 of 2048 inputs)
        w, h = quantize_rows(torch.randn(5632, 2048), fmt), torch.randn(5632)
        us = _median_us(lambda: native.q_weighted_rows(w, None, h), 30)
        rows.append(dict(kernel="row_sums", fmt=fmt, shape=[5632, 2048], us=round(us, 1),
                         gbs=round(w.nbytes / us / 1e3, 1)))
        w, x = quantize_rows(torch.randn(2048, 2560), fmt), torch.randn(2048)
        us = _median_us(lambda: native.q_topk_linear(w, x, 1378), 50)
        rows.append(dict(kernel="topk_linear k=1378", fmt=fmt, shape=[2048, 2560], us=round(us, 1),
                         gbs=round(w.nbytes * 1378 / 2048 / us / 1e3, 1)))
        g, u = quantize_rows(torch.randn(1536, 576), fmt), quantize_rows(torch.randn(1536, 576), fmt)
        q = quantize_rows(torch.randn(576, 1536), fmt)
        x = torch.randn(576)
        for layout, down in (("neuron-major", w), ("row-major", TransposedRows(q.fmt, q.data, q.cols))):
            us = _median_us(lambda: native.q_ffn_dense(x, g, u, down, "silu"), 300)
            rows.append(dict(kernel=f"ffn_dense ({layout} down)", fmt=fmt, shape=[576, 1536], us=round(us, 1)))
    res = dict(threads=torch.get_num_threads(), bandwidth_gbs=round(read_bandwidth_gbs(get_executor("cpu"), 1024), 2),
               native=native.status(), kernels=rows)
    text = json.dumps(res, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
