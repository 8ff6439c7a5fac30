"""FFN speed-up vs sparsity on this machine, with the bandwidth floor, in one run.

    python bench/ffn_sweep.py [--shape 4096x11008] [--dtype bf16] [--out bench/results/cpu_ffn_sweep.json]

Writes the JSON and a PNG (same name) of measured speed-up (dense / sparse, predictor included)
and the ideal speed-up if the sparse path ran at the measured read bandwidth."""
import argparse
import json
from pathlib import Path

from edgesparse.benchmarks.ffn import bench_ffn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x11008")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default="bench/results/cpu_ffn_sweep.json")
    a = ap.parse_args()
    rows = [bench_ffn(a.shape, s, a.dtype, "cpu", repeats=a.repeats) for s in a.levels]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows))
    plot(rows, str(Path(a.out).with_suffix(".png")), a.shape, a.dtype)


def plot(rows, path, shape, dtype):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["sparsity"] for r in rows]
    ax.plot(xs, [r["speedup"] for r in rows], "o-", label="predictor-sparse (measured)")
    ax.plot(xs, [r["exact_speedup"] for r in rows], "s-", label="exact-sparse (measured)")
    ax.plot(xs, [r["dense_bytes"] / r["touched_bytes"] for r in rows], "k--",
            label="floor: dense bytes / touched bytes")
    ax.set_yscale("log")
    ax.set_xlabel("FFN sparsity (share of up/down rows skipped)")
    ax.set_ylabel("speed-up over dense FFN")
    ax.set_title(f"FFN {shape} {dtype}, {rows[0]['threads']} CPU threads")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)

if __name__ == "__main__":
    main()
