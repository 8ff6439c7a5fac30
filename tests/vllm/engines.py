"""The vLLM engines of tests/vllm, built one after the other in one process (each start costs
~20 s on 2 cores, so every test reads this one run's results).  vLLM starts its engine core in
a spawned process, hence a script with a ``__main__`` guard.

    python tests/vllm/engines.py SWIGLU_DIR RELU_DIR QWEN2_DIR MISTRAL_DIR TINY_DIR TINY_ARTIFACTS OUT.json

Writes JSON: greedy token ids per engine and prompt, the plugin's batch-path counters, and
the error a foreign artifact dir raised."""
import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # LLM.apply_model pickles a function

PROMPTS = ["Once upon a time", "The cat sat on", "def f(x):", "In 1990 the"]
MAX_TOKENS = 20
ENGINE = dict(max_model_len=256, enforce_eager=True, kv_cache_memory_bytes=64 << 20, seed=0)


def run(model, prompts_alone=True, **kw):
    from vllm import LLM, SamplingParams
    from edgesparse.vllm.model import edgesparse_stats
    llm = LLM(model=model, dtype="float32", **ENGINE, **kw)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    res = {"batch": [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, sp, use_tqdm=False)]}
    if prompts_alone:
        res["alone"] = [list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids) for p in PROMPTS]
    arch = (kw.get("hf_overrides") or {}).get("architectures", [""])[0]
    if arch.startswith("EdgeSparse"):
        res["stats"] = llm.apply_model(edgesparse_stats)[0]
    del llm
    import gc
    gc.collect()
    return res


def main(swiglu, relu, qwen2, mistral, tiny, tiny_arts, out):
    plugin = lambda **o: {"hf_overrides": {"architectures": ["EdgeSparseLlamaForCausalLM"], **o}}  # noqa: E731
    results = {"prompts": PROMPTS}
    results["stock_swiglu"] = run(swiglu, prompts_alone=False)
    results["plugin_swiglu_dense"] = run(swiglu, prompts_alone=False, **plugin())
    for name, path, arch in (("qwen2", qwen2, "EdgeSparseQwen2ForCausalLM"),
                             ("mistral", mistral, "EdgeSparseMistralForCausalLM")):
        results[f"plugin_{name}_dense"] = run(path, prompts_alone=False, hf_overrides={"architectures": [arch]})
    # break-even 1.0: batches always take the candidate union, so "batch == alone" tests the
    # union path itself (the dense fallback is tested in test_mlp.py)
    results["plugin_tiny_predictor"] = run(tiny, **plugin(edgesparse_artifacts=tiny_arts,
                                                           edgesparse_union_break_even=1.0))
    try:   # another model's artifacts: refused at load, with edgesparse's error
        run(relu, prompts_alone=False, **plugin(edgesparse_artifacts=tiny_arts))
        results["foreign_artifacts_error"] = None
    except Exception:   # noqa: BLE001 - the engine core's failure reaches us as a RuntimeError
        results["foreign_artifacts_error"] = traceback.format_exc()
    with open(out, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main(*sys.argv[1:8])
