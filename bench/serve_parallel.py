"""``edgesparse serve`` with 1 slot against N continuously batched slots, one sitting: 32
concurrent clients (OpenAI chat completions asking for a story, greedy, streamed), each asking for the same number
of tokens (an answer may stop earlier at its end token: throughput counts the tokens made).  Prints JSON: aggregate tokens/s, time to first token and request latency
(medians and p90), whether every answer equals the 1-slot server's, the in-process time of one
decode step of 1, 2, 4 and 8 sequences, and the machine's read bandwidth.  Not part of CI.

    python bench/serve_parallel.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--slots 4]
        [--clients 32] [--tokens 32] [--threads 2] [--out bench/results/serve_parallel.json]
    python bench/serve_parallel.py --synthetic tinyllama-1.1b --work /tmp/tl --slots 1 2 4 8
        --serve-args "--weights q4_0" --sparse --out bench/results/serve_parallel_tinyllama.json

``--synthetic tinyllama-1.1b`` writes a random-weight ReGLU Llama of TinyLlama-1.1B's shape with
the Llama-2 tokenizer (once, under ``--work``; needs the ``bench`` extra).  ``--sparse`` also
calibrates predictor artifacts (random weights have no natural sparsity: the thresholds are
set to skip 86% of gate rows, as ``bench decode`` does) and measures every slot count again
with them.  The in-process step times cover both batch strategies (``rows``: one batched step,
``each``: the single-sequence step per sequence; the server measures and keeps the faster).
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


CHAT = True   # chat completions; plain completions for a model without a chat template (--synthetic)


def one(base: str, prompt: str, tokens: int) -> dict:
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            **({"messages": [{"role": "user", "content": prompt}]} if CHAT else {"prompt": prompt})}
    t0, first, text = time.perf_counter(), None, ""
    with httpx.stream("POST", base + ("/v1/chat/completions" if CHAT else "/v1/completions"), json=body,
                      timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ch = json.loads(line[6:])["choices"][0]
                piece = (ch["delta"].get("content") if CHAT else ch.get("text")) or ""
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


def step_times(model_path: str, rows=(1, 2, 4, 8), steps: int = 20, serve_args=(), artifacts=None) -> dict:
    """In-process ms per decode step: the single-sequence step for 1 row (what one slot runs);
    for more, ``DecoderModel.decode_rows`` (``rows``) and the single step per sequence
    (``each``), the two strategies a batched server step chooses between, after a short prompt."""
    import torch
    import edgesparse
    opts = dict(zip(serve_args[::2], serve_args[1::2]))
    llm = edgesparse.load(model_path, backend="cpu", dtype=opts.get("--dtype"), weights=opts.get("--weights"),
                          artifacts=artifacts)
    m, ids = llm.model, llm.engine.encode("Write a long story about a lighthouse keeper.")

    def prefilled():
        c = m.new_cache(1, len(ids) + 2 * steps + 8)
        m.forward(torch.tensor([ids]), c, torch.arange(len(ids))[None])
        return c
    out = {}
    with torch.inference_mode():
        for b in rows:
            caches = [prefilled() for _ in range(b)]

            def single(c):
                m.forward(torch.tensor([[5]]), c, torch.tensor([[c.length]]))

            def timed(step):
                for _ in range(3):
                    step()
                t = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    step()
                    t.append(time.perf_counter() - t0)
                ms = statistics.median(t) * 1e3
                return dict(ms_per_step=round(ms, 2), tok_s=round(1000 * b / ms, 1))
            if b == 1:
                out["1"] = timed(lambda: single(caches[0]))
                continue
            out[str(b)] = {"rows": timed(lambda: m.decode_rows([5] * b, caches, [c.length for c in caches])),
                           "each": timed(lambda: [single(c) for c in caches])}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--slots", type=int, nargs="+", default=[4], help="slot counts besides 1")
    ap.add_argument("--synthetic", choices=["tinyllama-1.1b"], default=None)
    ap.add_argument("--work", default="/tmp/serve_parallel", help="where --synthetic writes its model")
    ap.add_argument("--serve-args", default="", help="extra `edgesparse serve` options, e.g. \"--weights q4_0\"")
    ap.add_argument("--sparse", action="store_true", help="also with calibrated predictor artifacts")
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
    serve_args = a.serve_args.split()
    model = a.model
    if a.synthetic:
        global CHAT
        CHAT = False
        sys.path.insert(0, str(ROOT / "bench" / "peers"))
        from llamacpp import synthetic_hf
        model = str(synthetic_hf(Path(a.work), act="relu", dtype="bfloat16"))
    out = dict(model=a.synthetic or Path(model).name, clients=a.clients, tokens_each=a.tokens, threads=a.threads,
               serve_args=a.serve_args, bandwidth_gbs=round(bw, 2))
    variants = {"dense": None}
    if a.sparse:
        arts = Path(a.work) / "artifacts"
        if not (arts / "manifest.json").exists():
            import subprocess
            subprocess.run([sys.executable, "-m", "edgesparse", "calibrate", model, "-o", str(arts), "--tokens", "4096",
                            *(["--target-sparsity", "0.86"] if a.synthetic else []), *serve_args], check=True)
        variants["sparse"] = str(arts)
    slot_counts = [1] + [n for n in a.slots if n != 1]
    for name, arts in variants.items():
        extra = serve_args + (["--artifacts", arts] if arts else [])
        res = out[name] = {"decode_step": step_times(model, tuple(slot_counts), serve_args=serve_args, artifacts=arts)}
        for slots in slot_counts:
            s = Server(model, *extra, "--parallel", str(slots))
            try:
                one(s.base, "warm up", 4)
                res[f"slots_{slots}"] = run(s.base, prompts, a.tokens)
            finally:
                s.stop()
        base = res["slots_1"]
        for slots in slot_counts[1:]:
            par = res[f"slots_{slots}"]
            par["same_answers_as_1"] = base["texts"] == par["texts"]
            par["throughput_ratio"] = round(par["tok_s"] / base["tok_s"], 3)
            par["median_latency_ratio"] = round(par["latency_median_s"] / base["latency_median_s"], 3)
        for slots in slot_counts:
            res[f"slots_{slots}"].pop("texts")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
