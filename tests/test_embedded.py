"""The shipped `tiny` model: a real HF checkpoint, sparse by training, and the demo on it."""
import subprocess
import sys

import torch

import edgesparse
from edgesparse.embedded import TINY, TINY_ARTIFACTS


def test_tiny_is_a_small_plain_transformers_checkpoint():
    from transformers import AutoModelForCausalLM
    size = sum(f.stat().st_size for f in TINY.glob("*.safetensors"))
    assert size <= 16 * 2**20
    hf = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    llm = edgesparse.load("tiny", backend="cpu", dtype="fp32")
    llm.set_ffn_mode("dense")
    ids = torch.tensor([llm.engine.encode("The history of the city of London")])
    with torch.no_grad():
        ours = llm.model.forward(ids, llm.model.new_cache(1, ids.shape[1]),
                                 torch.arange(ids.shape[1])[None], all_logits=True)
        assert torch.allclose(ours, hf(ids).logits, atol=1e-4)


def test_tiny_is_naturally_sparse_and_shipped_artifacts_match():
    llm = edgesparse.load("tiny", backend="cpu", artifacts=TINY_ARTIFACTS)
    assert llm.model.ffn_mode == "predictor"
    m = llm.model
    m.stats.reset()
    ids = torch.tensor([llm.engine.encode("In 1990 the team won the national championship for the first time.")])
    with torch.no_grad():
        m.forward(ids, m.new_cache(1, ids.shape[1]), torch.arange(ids.shape[1])[None], sparse_prefill=True)
    s = m.stats.summary()
    assert s["natural_sparsity"] > 0.8 and s["ffn_sparsity"] > 0.8 and s["predictor_recall"] > 0.9


def test_demo_prints_dense_and_sparse():
    r = subprocess.run([sys.executable, "-m", "edgesparse", "demo", "--max-new-tokens", "12"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[dense]" in r.stdout and "[predictor]" in r.stdout and "tok/s" in r.stdout
    assert "FFN sparsity" in r.stdout
