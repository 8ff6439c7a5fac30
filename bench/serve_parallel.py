"""``edgesparse serve`` with 1 slot against N continuously batched slots, one sitting: 32
concurrent clients (OpenAI chat completions asking for a story, greedy, streamed), each asking for the same number
of tokens (an answer may stop earlier at its end token: throughput counts the tokens made).  Prints JSON: aggregate tokens/s, time to first token and request latency
(medians and p90), whether every answer equals the 1-slot server's, the in-process time of one
decode step of 1, 2, 4 and 8 sequences, and the machine's read bandwidth.  Not part of CI.

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
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True}
    t0, first, text = time.perf_counter(), None, ""
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
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


def step_times(model_path: str, rows=(1, 2, 4, 8), steps: int = 20) -> dict:
    """In-process ms per decode step: the single-sequence step for 1 row (what one slot runs),
    ``DecoderModel.decode_rows`` for more (what a batched step runs), after a 10-token prompt."""
    import torch
    import edgesparse
    llm = edgesparse.load(model_path, backend="cpu")
    m, ids = llm.model, llm.engine.encode("Write a long story about a lighthouse keeper.")

    def prefilled():
        c = m.new_cache(1, len(ids) + 2 * steps + 8)
        m.forward(torch.tensor([ids]), c, torch.arange(len(ids))[None])
        return c
    out = {}
    with torch.inference_mode():
        for b in rows:
            caches = [prefilled() for _ in range(b)]

            def one_step():
                if b == 1:
                    c = caches[0]
                    m.forward(torch.tensor([[5]]), c, torch.tensor([[c.length]]))
                else:
                    m.decode_rows([5] * b, caches, [c.length for c in caches])
            for _ in range(3):
                one_step()
            t = []
            for _ in range(steps):
                t0 = time.perf_counter()
                one_step()
                t.append(time.perf_counter() - t0)
            ms = statistics.median(t) * 1e3
            out[str(b)] = dict(ms_per_step=round(ms, 2), tok_s=round(1000 * b / ms, 1))
    return out


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
    topics = ["a lighthouse keeper", "a lost cat", "the first day of school", "a storm at sea", "a robot chef",
              "an old map", "a mountain village", "a broken clock"]
    prompts = [f"Write a long story about {topics[i % len(topics)]} (number {i})." for i in range(a.clients)]
    out = dict(model=Path(a.model).name, clients=a.clients, tokens_each=a.tokens, threads=a.threads,
               bandwidth_gbs=round(bw, 2))
    out["decode_step"] = step_times(a.model)
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
