"""The own engine against transformers' forward (the oracle): prefill and every decode step."""
import pytest
import torch

import edgesparse
from edgesparse.sampling import SamplingParams

FAMILIES = [("llama", "relu", {}), ("llama", "silu", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
             "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
            ("mistral", "silu", {}), ("qwen2", "relu", {}), ("llama", "relu", {"tie_word_embeddings": False})]


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family,act,over", FAMILIES, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_logits_match_transformers_prefill_and_decode(ckpt_factory, family, act, over):
    path = ckpt_factory(family, act, **over)
    llm = edgesparse.load(path, backend="cpu")
    llm.set_ffn_mode("dense")
    hf = hf_model(path)
    torch.manual_seed(1)
    ids = torch.randint(1, 300, (1, 20))
    m = llm.model
    cache = m.new_cache(1, 40)
    with torch.no_grad():
        ours = m.forward(ids, cache, torch.arange(20)[None], all_logits=True)
        ref = hf(ids).logits
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()
        seq = ids
        for step in range(12):  # crosses mistral's sliding window (12)
            nxt = ref[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            ours = m.forward(nxt, cache, torch.tensor([[seq.shape[1] - 1]]))
            ref = hf(seq).logits
            assert torch.allclose(ours, ref[:, -1], atol=1e-4, rtol=0), (step, (ours - ref[:, -1]).abs().max())


def test_greedy_generation_matches_transformers_generate(llama_relu):
    llm = edgesparse.load(llama_relu, backend="cpu")
    llm.set_ffn_mode("dense")
    hf = hf_model(llama_relu)
    ids = llm.engine.encode("The quick brown fox")
    out = llm.engine.generate_ids([ids], SamplingParams(max_new_tokens=10, stop_token_ids=[]))[0]
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == ref


def test_batch_with_left_padding_equals_single(llama_relu):
    llm = edgesparse.load(llama_relu, backend="cpu")
    prompts = ["The quick brown fox jumps over", "Edge", "Sparse activations skip"]
    p = SamplingParams(max_new_tokens=8, stop_token_ids=[])
    batched = llm.engine.generate_ids([llm.engine.encode(x) for x in prompts], p)
    for prompt, b in zip(prompts, batched):
        single = llm.engine.generate_ids([llm.engine.encode(prompt)], p)[0]
        assert b.token_ids == single.token_ids


def test_exact_sparse_equals_dense(llama_relu):
    llm = edgesparse.load(llama_relu, backend="cpu")
    m = llm.model
    ids = torch.randint(1, 300, (1, 16))
    outs = {}
    for mode in ("dense", "exact"):
        m.set_ffn_mode(mode)
        m.stats.reset()
        cache = m.new_cache(1, 32)
        with torch.no_grad():
            steps = [m.forward(ids[:, :8], cache, torch.arange(8)[None])]
            for t in range(8, 16):
                steps.append(m.forward(ids[:, t:t + 1], cache, torch.tensor([[t]])))
        outs[mode] = torch.stack(steps)
    assert torch.allclose(outs["dense"], outs["exact"], atol=1e-5, rtol=0)
    s = m.stats.summary()
    assert 0.2 < s["ffn_sparsity"] < 0.8 and s["gate_sparsity"] == 0  # random relu: about half active


def test_exact_sparse_needs_reglu(ckpt_factory):
    llm = edgesparse.load(ckpt_factory("llama", "silu"), backend="cpu")
    with pytest.raises(edgesparse.InvalidOptionError, match="ReGLU"):
        llm.set_ffn_mode("exact")


def test_sampling_is_seeded(llama_relu):
    llm = edgesparse.load(llama_relu, backend="cpu")
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a, b = llm.generate("The quick", **kw), llm.generate("The quick", **kw)
    c = llm.generate("The quick", **{**kw, "seed": 8})
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stream_concatenates_to_generate(llama_relu):
    llm = edgesparse.load(llama_relu, backend="cpu")
    full = llm.generate("Sparse activations", max_new_tokens=15)
    pieces = list(llm.stream("Sparse activations", max_new_tokens=15))
    assert "".join(pieces) == full.text and len(pieces) > 1


def test_stop_string_cuts_text(llama_relu):
    llm = edgesparse.load(llama_relu, backend="cpu")
    full = llm.generate("The quick", max_new_tokens=20, stop_token_ids=[]).text
    stop = full[5:8]
    assert stop.strip()
    cut = llm.generate("The quick", max_new_tokens=20, stop=[stop], stop_token_ids=[])
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"
    assert "".join(llm.stream("The quick", max_new_tokens=20, stop=[stop], stop_token_ids=[])) == cut.text


def test_modes_context_validates_and_restores(llama_relu):
    llm = edgesparse.load(llama_relu, backend="cpu")
    m = llm.model
    assert m.ffn_mode == "exact"
    with m.modes(ffn="dense", attn="dense"):
        assert (m.ffn_mode, m.attn_mode) == ("dense", "dense")
    assert m.ffn_mode == "exact"
    with pytest.raises(edgesparse.InvalidOptionError):
        with m.modes(ffn="predictor"):   # no artifacts
            pass
    assert m.ffn_mode == "exact"
