"""SmolLM2-135M-Instruct, its own Q4_1 file, in llama.cpp and edgesparse in one sitting:
dense decode tok/s with the native decoder layer (one C call per layer) and with the
composed executor ops, plus whether their greedy tokens agree; 25% rotated Top-K (attention
and MLP, calibrated here on calibrate's default text), native layer and composed ops alike;
load time, time to first token, and prompt processing of 512 tokens (llama-bench -p 512 -n 0;
its quantised prompt path crashes on CPUs with AMX, then pass --no-prompt).  Not part of CI.

    python bench/peers/smollm2_step.py --llama-cpp /tmp/peer/llama.cpp \
        [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf] [--threads 2] [--out bench/results/smollm2_step.json]

llama.cpp: its built source tree (``bench/peers/llamacpp.py`` builds it and runs ``llama-bench -t T
-p 0 -n 64 -r 3`` through the same function).
edgesparse: ``generate`` of 64 new tokens (no early stop) after a short prompt, 5 rounds per
path, interleaved; tok/s as ``Completion.tokens_per_s`` reports it (decode only)."""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from llamacpp import llama_bench   # this folder's peer benchmark

ROOT = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source dir with build/bin/llama-bench")
    ap.add_argument("--gguf", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/smollm2_step.json")
    ap.add_argument("--no-prompt", action="store_true", help="skip the 512-token prompt comparison")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import edgesparse
    from edgesparse.benchmarks.ffn import read_bandwidth_gbs
    peer = llama_bench(a.llama_cpp, a.gguf, a.threads)["samples"]

    t0 = time.perf_counter()
    llm = edgesparse.load(a.gguf, backend="cpu")
    load_s = time.perf_counter() - t0
    prompt = "The capital of France is"
    kw = dict(max_new_tokens=64, stop_token_ids=[])
    ttft = llm.generate(prompt, max_new_tokens=1).prefill_s   # the first call: nothing warmed
    samples, tokens = {}, {}

    def interleaved(model_llm, native: str, composed: str):
        """``a.rounds`` rounds of the native layer step and the composed ops, alternating."""
        samples[native], samples[composed] = [], []
        for _ in range(a.rounds):
            for name, fused in ((native, True), (composed, False)):
                model_llm.model.fused_decode = fused
                c = model_llm.generate(prompt, **kw)
                samples[name].append(round(c.tokens_per_s, 2))
                tokens[name] = c.token_ids
        model_llm.model.fused_decode = True
    interleaved(llm, "native_layer", "composed")
    with tempfile.TemporaryDirectory() as tmp:   # calibrate's default text (never WikiText-2 test)
        arts = edgesparse.calibrate(a.gguf, f"{tmp}/a", backend="cpu", tokens=4096, attn_sparsity=0.25,
                                    mlp_sparsity=0.25)["artifacts"]
        topk = edgesparse.load(a.gguf, backend="cpu", artifacts=arts)
        interleaved(topk, "topk25", "topk25_composed")   # the native step: Top-K SwiGLU, adapters
    pp = {}
    if not a.no_prompt:   # 512 prompt tokens of calibrate's default text, then one new token
        from edgesparse.sampling import SamplingParams
        from edgesparse.sparsity.calibrate import default_data
        ids = llm.tokenizer(default_data()[0].read_text()[:20_000], add_special_tokens=False)["input_ids"][:512]
        runs = [llm.engine.generate_ids([ids], SamplingParams(max_new_tokens=1))[0].prefill_s for _ in range(3)]
        peer_pp = llama_bench(a.llama_cpp, a.gguf, a.threads, prompt=512, gen=0)["tok_s"]
        pp = {"prompt512_tok_s": round(512 / statistics.median(runs), 1), "llama_cpp_prompt512_tok_s": peer_pp,
              "prompt512_vs_llama_cpp": round(512 / statistics.median(runs) / peer_pp, 3)}
    peer_med = statistics.median(peer)
    res = {
        "model": a.gguf.name, "threads": a.threads, "bandwidth_gbs": round(read_bandwidth_gbs(llm.model.ex), 2),
        "llama_cpp_tok_s": round(peer_med, 2), "llama_cpp_samples": peer,
        **{f"{k}_tok_s": round(statistics.median(v), 2) for k, v in samples.items()},
        **{f"{k}_samples": v for k, v in samples.items()},
        "native_layer_vs_llama_cpp": round(statistics.median(samples["native_layer"]) / peer_med, 3),
        "composed_vs_llama_cpp": round(statistics.median(samples["composed"]) / peer_med, 3),
        "native_layer_vs_composed": round(statistics.median(samples["native_layer"])
                                          / statistics.median(samples["composed"]), 3),
        "topk25_vs_llama_cpp": round(statistics.median(samples["topk25"]) / peer_med, 3),
        "topk25_weights": sorted({getattr(l.attn.qkv.weight_t, "fmt", "float") for l in topk.model.layers}),
        "topk25_vs_native_dense": round(statistics.median(samples["topk25"])
                                        / statistics.median(samples["native_layer"]), 3),
        "greedy_tokens_identical": tokens["native_layer"] == tokens["composed"],
        "topk25_greedy_tokens_identical": tokens["topk25"] == tokens["topk25_composed"],
        "load_s": round(load_s, 2), "first_token_s": round(ttft, 3), **pp,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
