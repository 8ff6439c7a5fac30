"""Prompt processing (prefill), edgesparse vs llama.cpp on one machine in one run (not part of
CI: the llama.cpp build takes ~15 min on 2 cores).

    python bench/peers/llamacpp_prefill.py --work /tmp/peer [--threads 2] [--prompts 16 64 256]
        [--rounds 2] [--gguf FILE] [--out bench/results/peer_tinyllama_prefill.json]

The model is the synthetic TinyLlama-1.1B shape of ``bench/peers/llamacpp.py`` as the very
q4_0 GGUF llama.cpp reads, or any GGUF file given with ``--gguf`` (e.g. SmolLM2's own Q4_1).  llama.cpp: ``llama-batched-bench -npp P -ntg 1 -npl 1``, its
``speed_pp`` (prompt tokens / prompt time).  edgesparse: the same file loaded in-process, one
forward of a P-token prompt into a fresh cache (median of 5 after 2 warm-ups), with the prompt
GEMM (``es_prompt_gemm``: 16-row tiles repacked in lane order) and, for comparison, with the
decode-batch GEMM every prompt used before (``es_gemm``: four rows by four tokens).  The
three are interleaved for ``--rounds`` rounds, because this VM's speed moves between minutes;
prints JSON with medians, ratios against llama.cpp per round and the measured read bandwidth."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "peers"))
from llamacpp import build_llama_cpp, run, synthetic_gguf  # noqa: E402


def llama_prefill(src: Path, gguf: Path, threads: int, prompts) -> dict:
    r = run([src / "build" / "bin" / "llama-batched-bench", "-m", gguf, "-c", 2048, "-b", 512, "-ub", 512,
             "-npp", ",".join(map(str, prompts)), "-ntg", 1, "-npl", 1, "-t", threads, "-tb", threads,
             "--output-format", "jsonl"], capture_output=True, text=True)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {str(x["pp"]): round(x["speed_pp"], 2) for x in rows}


def ours_prefill(llm, prompt: int, prompt_gemm: bool, reps: int = 5) -> float:
    import torch
    import edgesparse.backends.cpu as cpu
    m = llm.model
    ids = torch.randint(100, 30000, (1, prompt), generator=torch.Generator().manual_seed(prompt)) % m.spec.vocab_size
    saved = cpu.CpuExecutor.prompt
    if not prompt_gemm:   # the GEMM every prompt used before
        cpu.CpuExecutor.prompt = lambda self: contextlib.nullcontext()
    try:
        times = []
        for i in range(reps + 2):
            cache = m.new_cache(1, prompt + 1)
            t0 = time.perf_counter()
            with torch.inference_mode():
                m.forward(ids, cache, torch.arange(prompt)[None])
            if i >= 2:
                times.append(time.perf_counter() - t0)
    finally:
        cpu.CpuExecutor.prompt = saved
    return round(prompt / statistics.median(times), 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gguf", type=Path, default=None, help="a GGUF file instead of the synthetic TinyLlama q4_0")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/peer_tinyllama_prefill.json")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    src = build_llama_cpp(a.work, ("llama-bench", "llama-quantize", "llama-batched-bench"))
    gguf = a.gguf or synthetic_gguf(a.work, src, ["q4_0"])["q4_0"]

    import torch
    import edgesparse
    from edgesparse.backends.cpu import CpuExecutor
    from edgesparse.benchmarks.ffn import read_bandwidth_gbs
    torch.set_num_threads(a.threads)
    llm = edgesparse.load(str(gguf), backend="cpu")
    res = dict(model=(str(a.gguf) if a.gguf else "synthetic TinyLlama-1.1B shape, q4_0 GGUF") + " (both runtimes read it)",
               threads=a.threads, activations=str(llm.model.dtype), rounds=[])
    for _ in range(a.rounds):
        rnd = dict(bandwidth_gbs=round(read_bandwidth_gbs(CpuExecutor("cpu")), 2),
                   llama_cpp_tok_s=llama_prefill(src, gguf, a.threads, a.prompts), prompt_gemm={}, decode_gemm={})
        for p in a.prompts:
            rnd["prompt_gemm"][str(p)] = ours_prefill(llm, p, True)
            rnd["decode_gemm"][str(p)] = ours_prefill(llm, p, False)
        peer = rnd["llama_cpp_tok_s"]
        rnd["vs_llama_cpp"] = {k: round(v / peer[k], 3) for k, v in rnd["prompt_gemm"].items() if k in peer}
        rnd["before_vs_llama_cpp"] = {k: round(v / peer[k], 3) for k, v in rnd["decode_gemm"].items() if k in peer}
        rnd["prompt_vs_decode_gemm"] = {k: round(v / rnd["decode_gemm"][k], 3) for k, v in rnd["prompt_gemm"].items()}
        res["rounds"].append(rnd)
        print(json.dumps(rnd), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
