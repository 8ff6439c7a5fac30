"""A new model family is one module (here: a Family object) plus one registry line.

The toy family stores the Llama layout under its own tensor names and architecture name,
which edgesparse refuses until the family is registered; then it loads, matches transformers
on the same weights, and calibrates like any built-in family."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import edgesparse
from edgesparse.errors import InvalidOptionError, UnsupportedModelError
from edgesparse.models import Family, TensorNames, architectures, family_of, register_family
from edgesparse.models import families

TOY_NAMES = TensorNames(
    embed="tok_embeddings.weight", norm="final_norm.scale", lm_head="output.weight",
    attn_norm="blocks.{i}.ln_attn.scale", q="blocks.{i}.attn.wq.weight", k="blocks.{i}.attn.wk.weight",
    v="blocks.{i}.attn.wv.weight", o="blocks.{i}.attn.wo.weight", mlp_norm="blocks.{i}.ln_mlp.scale",
    gate="blocks.{i}.ffn.w1.weight", up="blocks.{i}.ffn.w3.weight", down="blocks.{i}.ffn.w2.weight")
TOY = Family(name="toy", tensors=TOY_NAMES)


def _rename(hf_name: str) -> str:
    """HF Llama name -> toy name, through the two TensorNames maps."""
    llama = TensorNames()
    if hf_name in (llama.embed, llama.norm, llama.lm_head):
        field = {llama.embed: "embed", llama.norm: "norm", llama.lm_head: "lm_head"}[hf_name]
        return getattr(TOY_NAMES, field)
    i = int(hf_name.split(".")[2])
    for field in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"):
        if getattr(llama, field).format(i=i) == hf_name:
            return getattr(TOY_NAMES, field).format(i=i)
    raise KeyError(hf_name)


@pytest.fixture
def toy_ckpt(ckpt_factory, tmp_path):
    src = ckpt_factory("llama", "relu", tie_word_embeddings=False)
    out = tmp_path / "toy"
    shutil.copytree(src, out)
    sd = load_file(out / "model.safetensors")
    save_file({_rename(k): v for k, v in sd.items()}, out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["ToyLMForCausalLM"]       # model_type stays "llama": its config class
    (out / "config.json").write_text(json.dumps(cfg))
    return src, out


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))


def test_unregistered_family_is_refused(toy_ckpt, registry):
    with pytest.raises(UnsupportedModelError, match="ToyLMForCausalLM"):
        edgesparse.load(toy_ckpt[1], backend="cpu")


def test_toy_family_is_one_registry_line(toy_ckpt, registry, tmp_path):
    src, toy = toy_ckpt
    register_family("ToyLMForCausalLM", TOY)
    assert "ToyLMForCausalLM" in architectures() and family_of(["ToyLMForCausalLM"]) is TOY
    llm = edgesparse.load(toy, backend="cpu")
    assert llm.model.spec.family == "toy" and llm.model.ffn_mode == "exact"
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        want = hf(ids).logits[0, -1]
        llm.set_ffn_mode("dense")
        cache = llm.model.new_cache(1, 8)
        got = llm.model.forward(ids, cache, torch.arange(6)[None])[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    (tmp_path / "t.txt").write_text("toy text for calibration. " * 400)
    rep = edgesparse.calibrate(toy, tmp_path / "arts", data=[tmp_path / "t.txt"], backend="cpu", tokens=512,
                               window=64)
    assert rep["layers"] and edgesparse.load(toy, backend="cpu", artifacts=rep["artifacts"]).model.ffn_mode == "predictor"


def test_builtin_families_resolve_lazily():
    assert [family_of([a]).name for a in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")] == \
        ["llama", "mistral", "qwen2"]
    assert family_of([], "qwen2").name == "qwen2"


@pytest.mark.parametrize("bad", [None, 3, object()])
def test_register_family_rejects_non_families(bad, registry):
    with pytest.raises(InvalidOptionError):
        register_family("X", bad)
