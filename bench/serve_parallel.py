"""``edgesparse serve`` with 1 slot against N continuously batched slots, one sitting: 32
concurrent clients (OpenAI completions, greedy, streamed), each asking for the same number
of tokens (an answer may stop earlier at its end token: throughput counts the tokens made).  Prints JSON: aggregate tokens/s, time to first token and request latency
(medians and p90), whether every answer equals the 1-slot server's, and the machine's read
bandwidth.  Not part of CI.

    python bench/serve_parallel.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--slots 4]
        [--clients 32] [--tokens 32] [--threads 2] [--out bench/results/serve_parallel.json]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "apps"))
from serve_util import Server  # noqa: E402  (the test suite's server launcher)


def one(base: str, prompt: str, tokens: int) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    t0, first, text = time.perf_counter(), None, ""
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0]["text"]
                if piece and first is None:
                    first = time.perf_counter()
                text += piece
    end = time.perf_counter()
    return dict(text=text, ttft=(first or end) - t0, latency=end - t0)


def run(base: str, prompts: list[str], tokens: int) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        res = list(pool.map(lambda p: one(base, p, tokens), prompts))
    wall = time.perf_counter() - t0
    usage = httpx.get(base + "/metrics").text
    done = next(float(l.split()[-1]) for l in usage.splitlines() if l.startswith("edgesparse_completion_tokens_total"))
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    lat, ttft = [r["latency"] for r in res], [r["ttft"] for r in res]
    return dict(wall_s=round(wall, 2), completion_tokens=int(done), tok_s=round(done / wall, 1),
                ttft_median_s=round(statistics.median(ttft), 3), ttft_p90_s=round(q(ttft, 0.9), 3),
                latency_median_s=round(statistics.median(lat), 3), latency_p90_s=round(q(lat, 0.9), 3),
                texts=[r["text"] for r in res])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_parallel.json"))
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["TORCH_NUM_THREADS"] = str(a.threads)
    import torch
    from edgesparse.backends.cpu import CpuExecutor
    from edgesparse.benchmarks.ffn import read_bandwidth_gbs
    torch.set_num_threads(a.threads)
    bw = read_bandwidth_gbs(CpuExecutor("cpu"))
    prompts = [f"Question {i}: what is the tallest mountain you know of, and why?" for i in range(a.clients)]
    out = dict(model=Path(a.model).name, clients=a.clients, tokens_each=a.tokens, threads=a.threads,
               bandwidth_gbs=round(bw, 2))
    for slots in (1, a.slots):
        s = Server(a.model, "--parallel", str(slots))
        try:
            one(s.base, "warm up", 4)
            out[f"slots_{slots}"] = run(s.base, prompts, a.tokens)
        finally:
            s.stop()
    base, par = out["slots_1"], out[f"slots_{a.slots}"]
    out["same_answers"] = base.pop("texts") == par.pop("texts")
    out["throughput_ratio"] = round(par["tok_s"] / base["tok_s"], 3)
    out["median_latency_ratio"] = round(par["latency_median_s"] / base["latency_median_s"], 3)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
