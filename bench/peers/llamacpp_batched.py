"""Batched decoding, edgesparse vs llama.cpp on one machine in one run (not part of CI: the
llama.cpp build takes ~15 min on 2 cores).

    python bench/peers/llamacpp_batched.py --work /tmp/peer [--threads 2] [--batches 1 2 4]
        [--out bench/results/peer_tinyllama_batched.json]

The model is the synthetic TinyLlama-1.1B shape of ``bench/peers/llamacpp.py`` in q4_0
(llama.cpp: its SwiGLU GGUF; edgesparse: the ReGLU twin with the same matrices, so the same
bytes per token).  llama.cpp: ``llama-batched-bench -npp 8 -ntg 32 -npl 1,2,4,8`` (prompt not
shared), its text-generation speed ``speed_tg`` = all generated tokens / generation time.
edgesparse: the in-process decode step of B sequences (``bench/serve_parallel.py``'s
``step_times``: ``rows`` = one batched step, ``each`` = the single step per sequence), dense and
with predictor artifacts set to skip 86% of gate rows (random weights have no natural sparsity).
Prints JSON with ratios against llama.cpp at each batch size and the measured read bandwidth."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "peers"))
from llamacpp import build_llama_cpp, run, synthetic_gguf, synthetic_hf  # noqa: E402


def llama_batched(src: Path, gguf: Path, threads: int, batches) -> dict:
    r = run([src / "build" / "bin" / "llama-batched-bench", "-m", gguf, "-c", 1024, "-b", 256, "-ub", 256,
             "-npp", 8, "-ntg", 32, "-npl", ",".join(map(str, batches)), "-t", threads, "-tb", threads,
             "--output-format", "jsonl"], capture_output=True, text=True)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {str(x["pl"]): round(x["speed_tg"], 2) for x in rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/peer_tinyllama_batched.json")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    src = build_llama_cpp(a.work, ("llama-bench", "llama-quantize", "llama-batched-bench"))
    gguf = synthetic_gguf(a.work, src, ["q4_0"])["q4_0"]
    peer = llama_batched(src, gguf, a.threads, a.batches)

    import torch
    from edgesparse.backends.cpu import CpuExecutor
    from edgesparse.benchmarks.ffn import read_bandwidth_gbs
    from serve_parallel import step_times
    torch.set_num_threads(a.threads)
    model = str(synthetic_hf(a.work, act="relu", dtype="bfloat16"))
    arts = a.work / "artifacts-relu-q4_0"
    if not (arts / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "edgesparse", "calibrate", model, "-o", str(arts), "--tokens", "4096",
                        "--target-sparsity", "0.86", "--weights", "q4_0"], check=True)
    res = dict(model="synthetic TinyLlama-1.1B shape, q4_0", threads=a.threads,
               bandwidth_gbs=round(read_bandwidth_gbs(CpuExecutor("cpu")), 2), llama_cpp_tok_s=peer, edgesparse={})
    for name, art in (("dense", None), ("sparse", str(arts))):
        steps = step_times(model, tuple(a.batches), serve_args=["--weights", "q4_0"], artifacts=art)
        row = {}
        for b in map(str, a.batches):
            best = steps[b] if b == "1" else max(steps[b].values(), key=lambda v: v["tok_s"])
            row[b] = dict(steps=steps[b], tok_s=best["tok_s"], vs_llama_cpp=round(best["tok_s"] / peer[b], 3))
        res["edgesparse"][name] = row
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
