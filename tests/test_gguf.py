"""A real pretrained checkpoint from a GGUF file: SmolLM2-135M-Instruct (fetched by .ci/run with
bench/get_smollm2.py; skipped only where that file is absent)."""
from pathlib import Path

import pytest

import edgesparse

GGUF = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(not GGUF.exists(), reason="run bench/get_smollm2.py first")


# "What is the capital of France?" is a near tie between "The" and "L" (0.08 of ~25 in the
# logits of the exact de-quantised weights): any rounding may pick either, so ask it this way.
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def smol():
    return edgesparse.load(GGUF, backend="cpu")


def test_smollm2_answers_a_chat_question(smol):
    assert smol.model.spec.family == "llama" and smol.model.spec.act == "silu" and smol.model.ffn_mode == "dense"
    prompt = smol.chat_prompt([{"role": "user", "content": QUESTION}])
    out = smol.generate(prompt, max_new_tokens=20, stop_token_ids=smol.chat_stop_ids())
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_smollm2_topk_artifacts_roundtrip(smol, tmp_path):
    from conftest import DATA
    data = tmp_path / "wiki.txt"
    data.write_text((DATA / "wikitext-2-tok-valid.txt").read_text()[:30_000])
    rep = edgesparse.calibrate(GGUF, tmp_path / "a", data=[data], backend="cpu", tokens=1024,
                               attn_sparsity=0.25, mlp_sparsity=0.25)
    assert rep["topk"]["k"]["qkv"] < 576
    llm = edgesparse.load(GGUF, backend="cpu", artifacts=tmp_path / "a")
    assert llm.model.ffn_mode == "topk" and llm.model.attn_mode == "topk"
    prompt = llm.chat_prompt([{"role": "user", "content": QUESTION}])
    assert "Paris" in llm.generate(prompt, max_new_tokens=20, stop_token_ids=llm.chat_stop_ids()).text


def test_gguf_read_natively_matches_transformers_dequantisation():
    # fp32: every tensor de-quantised by our reader, q/k rows un-permuted: transformers' values
    import torch
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 30, 9]])
    with torch.no_grad():
        want = hf(ids).logits[0, -1]
    llm = edgesparse.load(GGUF, backend="cpu", weights="fp32")
    with torch.no_grad():
        got = llm.model.forward(ids, llm.model.new_cache(1, 8), torch.arange(8)[None])[0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_gguf_keeps_its_blocks_by_default(smol):
    from edgesparse.backends.formats import QuantRows
    layer = smol.model.layers[0]
    assert smol.model.ex.weight_format == "q4_1"
    assert isinstance(layer.attn.qkv.weight, QuantRows) and layer.attn.qkv.weight.fmt == "q4_1"
    # SwiGLU: the down projection stays the file's own row-major Q4_1 blocks, byte for byte
    from edgesparse.backends.formats import TransposedRows
    from gguf import GGUFReader
    down = layer.mlp.ffn.down_t
    assert isinstance(down, TransposedRows) and down.fmt == "q4_1"
    raw = next(t for t in GGUFReader(GGUF).tensors if t.name == "blk.0.ffn_down.weight")
    assert down.data.numpy().tobytes() == raw.data.tobytes()
    assert isinstance(smol.model.embed, QuantRows) and smol.model.lm_head.weight is smol.model.embed


def test_truncated_gguf_is_a_clear_error(tmp_path):
    from edgesparse.errors import ModelFilesError
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(GGUF.read_bytes()[:5_000_000])
    with pytest.raises(ModelFilesError):
        edgesparse.load(bad, backend="cpu")


def test_cached_gguf_config_reloads_without_the_family_config_class(tmp_path, monkeypatch):
    """The first load derives the config through transformers and caches every attribute; later
    loads rebuild it as a plain PretrainedConfig (no model modules imported) with the same spec
    and RoPE tables."""
    import torch
    from transformers.configuration_utils import PretrainedConfig
    from edgesparse import loader
    from edgesparse.models.families import family_of_config
    from edgesparse.models.spec import spec_from_config
    monkeypatch.setenv("EDGESPARSE_CACHE", str(tmp_path))
    derived = loader.load_config(GGUF)
    assert list(tmp_path.rglob(loader.FULL_CONFIG))
    light = loader.load_config(GGUF)
    assert type(light) is PretrainedConfig and type(derived) is not PretrainedConfig
    specs = [spec_from_config(c, family_of_config(c)) for c in (derived, light)]
    assert specs[0] == specs[1]
    for a, b in zip(loader.rope_tables(derived, specs[0], torch.float32), loader.rope_tables(light, specs[1], torch.float32)):
        assert torch.equal(a, b)
