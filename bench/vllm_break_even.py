"""Where a decode batch's candidate union stops paying: the union path of the vLLM plugin's
MLP (edgesparse/vllm/mlp.py: gate rows of the union, each token's own candidates, up/down rows)
against the dense FFN, for a few batch sizes, on the cpu executor.

    python bench/vllm_break_even.py [--hidden 2048 --ffn 5632] [--dtype fp32 bf16] > out.json

Each token predicts its own random set of ``--per-token`` shares of the neurons (random, so
independent between tokens: a trained model's sets overlap more) and about half of its
candidates come out active, as with a predictor tuned for high recall.  Prints JSON: per dtype,
batch size and per-token share, the union's share of the neurons and the times of the union
path and the dense FFN.  The union share where the two cross is the break-even
``UNION_BREAK_EVEN`` is set from (together with bench/vllm_concurrency.py's end-to-end runs)."""
import argparse
import json
import os
import platform
import time

import torch

from edgesparse.backends import get_executor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_of(fn, reps=7):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    ap.add_argument("--batch", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--per-token", nargs="+", type=float, default=[0.05, 0.1, 0.15, 0.2, 0.3])
    a = ap.parse_args()
    ex = get_executor("cpu")
    out_load = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    out = dict(shape=dict(hidden=a.hidden, ffn=a.ffn), threads=torch.get_num_threads(),
               cpu=platform.processor() or platform.machine(), load_avg_start=out_load, results=[])
    for name in a.dtype:
        dt = DTYPES[name]
        mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(dt)  # noqa: E731
        ffn = ex.prepare_ffn(mk(a.ffn, a.hidden), mk(a.ffn, a.hidden), mk(a.hidden, a.ffn), "relu")
        for b in a.batch:
            x = torch.randn(b, a.hidden, generator=g).to(dt)
            dense = best_of(lambda: ex.ffn_dense(x, ffn))
            for p in a.per_token:
                mask = torch.rand(b, a.ffn, generator=g) < p          # each token's own candidates
                cand = ex.nonzero_columns(mask)
                own = mask[:, cand]

                def union():
                    h = torch.relu(ex.gate_rows(x, ffn, cand)) * own
                    keep = ex.nonzero_columns(h > 0)
                    return ex.up_down_rows(x, h[:, keep], ffn, cand[keep])
                t = best_of(union)
                row = dict(dtype=name, batch=b, per_token=p, union_share=round(cand.numel() / a.ffn, 3),
                           union_ms=round(t * 1e3, 3), dense_ms=round(dense * 1e3, 3), union_faster=t < dense)
                out["results"].append(row)
                print(json.dumps(row), flush=True, file=__import__("sys").stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
