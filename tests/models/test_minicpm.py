"""MiniCPM (MiniCPM-S / ProSparse layout, FATReLU) and FATReLU Llama checkpoints, synthetic (the
real weights cannot be downloaded here), held against a plain torch forward written from the
published modeling code: embeddings x scale_emb, each residual branch x scale_depth/sqrt(L), the
final hidden state / (hidden_size / dim_model_base), and FATReLU(x) = x where x > t, else 0."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import edgesparse
from edgesparse.errors import UnsupportedModelError

# MiniCPM-S-1B-sft's config.json, shrunk (its real dims: 1536 / 3840, 52 layers, 24:8 heads,
# vocab 73,440, tied; threshold 0.03).  The threshold here is larger so that FATReLU and ReLU
# differ on random weights.
MINICPM = dict(architectures=["MiniCPMForCausalLM"], model_type="minicpm", hidden_act="fatrelu",
               hidden_act_param=0.25, scale_emb=12, dim_model_base=16, scale_depth=1.4,
               auto_map={"AutoConfig": "configuration_minicpm.MiniCPMConfig"})


def minicpm_checkpoint(ckpt_factory, tmp_path, **over):
    """A Llama checkpoint's weights under a MiniCPM-format config.json (MiniCPM's tensor names
    are Llama's); ``tie_word_embeddings`` is left out, as MiniCPM-S's config leaves it."""
    import shutil
    src = ckpt_factory("llama", "relu", seed=3, tie_word_embeddings=True, rms_norm_eps=1e-5)
    d = tmp_path / "minicpm"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    cfg.update(MINICPM, **over)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def reference_logits(d, ids: torch.Tensor) -> torch.Tensor:
    """The published forward, in fp32, straight from the checkpoint files."""
    cfg = json.loads((d / "config.json").read_text())
    w = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
    L, hd = cfg["num_hidden_layers"], cfg["hidden_size"] // cfg["num_attention_heads"]
    nh, nkv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    minicpm = cfg.get("model_type") == "minicpm"
    s_emb = cfg["scale_emb"] if minicpm else 1.0
    s_branch = cfg["scale_depth"] / math.sqrt(L) if minicpm else 1.0
    s_width = cfg["hidden_size"] / cfg["dim_model_base"] if minicpm else 1.0
    t = cfg.get("hidden_act_param", 0.0)

    def norm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope(x, pos):
        inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd))
        f = pos[:, None].float() * inv[None]
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
        rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rot * sin

    T = ids.shape[0]
    pos = torch.arange(T)
    h = w["model.embed_tokens.weight"][ids] * s_emb
    for i in range(L):
        p = f"model.layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        q, k = rope(q, pos), rope(k, pos)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        att = (q @ k.transpose(1, 2)) / math.sqrt(hd) + torch.full((T, T), float("-inf")).triu(1)
        o = (att.softmax(-1) @ v).transpose(0, 1).reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = h + o * s_branch
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        g = x @ w[p + "mlp.gate_proj.weight"].T
        act = torch.where(g > t, g, torch.zeros(())) if cfg["hidden_act"] == "fatrelu" else torch.relu(g)
        h = h + ((act * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T) * s_branch
    h = norm(h, w["model.norm.weight"]) / s_width
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return h @ head.T


IDS = torch.tensor([1, 17, 33, 5, 200, 9, 64, 3])


@pytest.fixture(scope="module")
def textfile(tmp_path_factory):
    from conftest import DATA
    p = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    p.write_text((DATA / "tinyshakespeare.txt").read_text()[:60_000])
    return p


def _logits(llm, ids):
    m = llm.model
    with torch.no_grad():
        return m.forward(ids[None], m.new_cache(1, len(ids)), torch.arange(len(ids))[None], all_logits=True)[0]


@pytest.mark.parametrize("mode", ["dense", "exact"])
def test_minicpm_format_matches_the_published_forward(ckpt_factory, tmp_path, mode):
    d = minicpm_checkpoint(ckpt_factory, tmp_path)
    llm = edgesparse.load(d, backend="cpu", dtype="fp32")
    assert llm.model.spec.family == "minicpm" and llm.model.spec.act == "fatrelu"
    assert llm.model.spec.act_threshold == 0.25 and llm.model.spec.tied
    llm.set_ffn_mode(mode)
    torch.testing.assert_close(_logits(llm, IDS), reference_logits(d, IDS), atol=2e-4, rtol=2e-4)
    # the threshold matters here: the same weights under plain ReLU give other logits
    relu = reference_logits(minicpm_checkpoint(ckpt_factory, tmp_path / "r", hidden_act="relu"), IDS)
    assert (relu - reference_logits(d, IDS)).abs().max() > 1e-2


def test_minicpm_decode_steps_match_the_prompt_forward(ckpt_factory, tmp_path):
    """Token by token (the decode paths, composed ops for FATReLU) = one prompt forward."""
    d = minicpm_checkpoint(ckpt_factory, tmp_path)
    llm = edgesparse.load(d, backend="cpu", dtype="fp32")
    want = reference_logits(d, IDS)
    for mode in ("dense", "exact"):
        llm.set_ffn_mode(mode)
        m = llm.model
        cache = m.new_cache(1, len(IDS))
        with torch.no_grad():
            got = torch.stack([m.forward(IDS[None, i:i + 1], cache, torch.tensor([[i]]))[0] for i in range(len(IDS))])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("weights", ["q8_0", "q4_0"])
def test_minicpm_runs_block_quantised(ckpt_factory, tmp_path, weights):
    d = minicpm_checkpoint(ckpt_factory, tmp_path)
    llm = edgesparse.load(d, backend="cpu", weights=weights)
    got, want = _logits(llm, IDS), reference_logits(d, IDS)
    assert torch.isfinite(got).all()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


def test_fatrelu_llama_format_matches_the_reference(ckpt_factory, tmp_path):
    """A llama-format FATReLU checkpoint (ProSparse-Llama-2 style): hidden_act fatrelu with
    hidden_act_param in a LlamaForCausalLM config."""
    import shutil
    src = ckpt_factory("llama", "relu", seed=4)
    d = tmp_path / "prosparse"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_act="fatrelu", hidden_act_param=0.2)
    (d / "config.json").write_text(json.dumps(cfg))
    llm = edgesparse.load(d, backend="cpu", dtype="fp32")
    assert llm.model.spec.family == "llama" and llm.model.spec.act_threshold == 0.2
    for mode in ("dense", "exact"):
        llm.set_ffn_mode(mode)
        torch.testing.assert_close(_logits(llm, IDS), reference_logits(d, IDS), atol=2e-4, rtol=2e-4)


def test_minicpm_calibrates_and_decodes_through_the_predictor(ckpt_factory, tmp_path, textfile):
    d = minicpm_checkpoint(ckpt_factory, tmp_path)
    rep = edgesparse.calibrate(d, tmp_path / "arts", data=[textfile], backend="cpu", tokens=2048, window=128,
                               rank=16, target_sparsity=0.5)   # the predictor in every layer
    assert rep["layers"] and all(l["natural_sparsity"] > 0 for l in rep["layers"])
    llm = edgesparse.load(d, backend="cpu", artifacts=tmp_path / "arts")
    assert llm.model.ffn_mode == "predictor"
    out = llm.generate("The quick brown fox", max_new_tokens=8, stop_token_ids=[])
    assert len(out.token_ids) == 8 and llm.model.stats.summary()["gate_sparsity"] > 0


@pytest.mark.parametrize("change, words", [
    (dict(hidden_act_param=None), "hidden_act_param"),
    (dict(hidden_act_param=-1), "hidden_act_param"),
    (dict(hidden_act="gelu_fancy"), "unsupported FFN activation"),
    (dict(scale_emb=None), "scale_emb"),
    (dict(dim_model_base=0), "dim_model_base"),
    (dict(num_experts=8), "mixture-of-experts"),
])
def test_bad_minicpm_configs_are_one_line_errors(ckpt_factory, tmp_path, change, words):
    d = minicpm_checkpoint(ckpt_factory, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=words) as e:
        edgesparse.load(d, backend="cpu")
    assert "\n" not in str(e.value)


def test_cli_loads_a_minicpm_checkpoint(ckpt_factory, tmp_path):
    import subprocess
    import sys
    d = minicpm_checkpoint(ckpt_factory, tmp_path)
    r = subprocess.run([sys.executable, "-m", "edgesparse", "generate", str(d), "--prompt", "The quick", "--raw",
                        "--max-new-tokens", "4", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] >= 1


@pytest.mark.parametrize("weights", ["q8_0", "q4_0"])
def test_fatrelu_native_layer_step_equals_the_composed_ops(ckpt_factory, tmp_path, weights):
    """Block formats decode every layer in one native call; with FATReLU's threshold in the
    layer descriptor its tokens equal the executor's composed ops (fused_decode off)."""
    d = minicpm_checkpoint(ckpt_factory, tmp_path)
    llm = edgesparse.load(d, backend="cpu", weights=weights)
    llm.set_ffn_mode("exact")
    fused = llm.generate("The quick brown fox", max_new_tokens=12, stop_token_ids=[]).token_ids
    llm.model.fused_decode = False
    composed = llm.generate("The quick brown fox", max_new_tokens=12, stop_token_ids=[]).token_ids
    assert fused == composed


def test_minicpm_float_source_holds_the_folded_weights(ckpt_factory, tmp_path):
    """Block formats keep a way back to the checkpoint's float values (LaRoSA folds into them);
    those values must be the ones the decoder runs, scalings folded in, or a rotated Top-K
    artifact of a MiniCPM model would unscale its o and down projections."""
    from edgesparse.backends.formats import dense
    d = minicpm_checkpoint(ckpt_factory, tmp_path)
    llm = edgesparse.load(d, backend="cpu", weights="q8_0")
    src, layer = llm.model.float_source, llm.model.layers[1]
    held = {"o": dense(layer.attn.o.weight, torch.float32), "down_t": dense(layer.mlp.ffn.down_t, torch.float32)}
    for name, stored in held.items():
        f = src.layer(1)[name].float()
        assert (f - stored).abs().max() < 0.02 * stored.abs().max(), name   # q8_0 rounding only
