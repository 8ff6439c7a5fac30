"""GPU FFN benchmark: Triton sparse kernels vs the dense cuBLAS GEMV at 7B shape.

    python bench/gpu_ffn.py [--shape 4096x11008] [--dtype bf16] [--weights float q8_0 q4_0 q4_1]
        [--out bench/results/gpu_ffn_<device>.json]

For sparsity 0.5 ... 0.95: FFN time dense vs predictor-sparse (kernels: score+compact,
gather gate, gather up + row-gather down), achieved GB/s on the bytes touched and % of the
device's datasheet peak; JSON plus a PNG.  Without a GPU, ``--interpret-smoke`` runs the same
code on the CPU under TRITON_INTERPRET=1 at a tiny shape (what CI does); timings are then
meaningless.  NOTE: no session of this project has had a GPU yet: never run on one."""
import argparse
import datetime
import json
import os
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x11008")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--weights", nargs="+", default=["float", "q8_0", "q4_0", "q4_1"],
                    choices=["float", "q8_0", "q4_0", "q4_1"], help="weight formats, one table each")
    ap.add_argument("--interpret-smoke", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from edgesparse.backends.cuda import CudaExecutor
    from edgesparse.benchmarks.ffn import bench_ffn
    gpu = torch.cuda.is_available() and not a.interpret_smoke
    ex = CudaExecutor("cuda:0" if gpu else "cpu", use_triton=True)
    shape = a.shape if gpu else "64x256"
    rows = [dict(bench_ffn(shape, s, a.dtype if gpu else "fp32", executor=ex, repeats=20 if gpu else 2,
                           bandwidth_mib=2048 if gpu else 8, weights=None if w == "float" else w), format=w)
            for w in a.weights for s in a.levels]
    device = torch.cuda.get_device_name(0) if gpu else "cpu (triton interpreter smoke run)"
    res = dict(device=device, date=datetime.date.today().isoformat(), rows=rows)
    print(json.dumps(res))
    if a.out or gpu:
        out = Path(a.out or f"bench/results/gpu_ffn_{device.replace(' ', '_')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        from ffn_sweep import plot
        for w in a.weights:
            plot([r for r in rows if r["format"] == w], str(out.with_name(f"{out.stem}_{w}.png")), shape,
                 a.dtype if w == "float" else w)


if __name__ == "__main__":
    main()
