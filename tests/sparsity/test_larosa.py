"""LaRoSA rotations folded into the weights, and Top-K projections."""
import pytest
import torch

import edgesparse
from edgesparse.sparsity.calibrate import calibrate
from edgesparse.predictors.rotation import block_topk_sizes, pca_rotation

from conftest import DATA


@pytest.fixture(scope="module")
def textfile(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "wiki.txt"
    p.write_text((DATA / "wikitext-2-tok-valid.txt").read_text()[:60_000])
    return p


def decode_logits(llm, ids, steps_from=6):
    m = llm.model
    cache = m.new_cache(1, ids.shape[1])
    with torch.no_grad():
        out = [m.forward(ids[:, :steps_from], cache, torch.arange(steps_from)[None])]
        for t in range(steps_from, ids.shape[1]):
            out.append(m.forward(ids[:, t:t + 1], cache, torch.tensor([[t]])))
    return torch.stack(out)


@pytest.mark.parametrize("act,rotation,method,scaled,tied", [
    ("silu", "shared", "rotated", False, True), ("silu", "per-site", "rotated", True, True),
    ("relu", "shared", "rotated", True, True), ("silu", "shared", "magnitude", False, True),
    ("silu", "shared", "magnitude", True, True), ("silu", "global", "rotated", True, True),
    ("relu", "global", "rotated", False, False)])
def test_full_k_equals_dense(ckpt_factory, textfile, tmp_path, act, rotation, method, scaled, tied):
    """Top-K with K = d through folded rotations, scales and adapters reproduces the dense model
    (untied: the end rotations are folded into the embedding and lm_head instead)."""
    path = ckpt_factory("llama", act, **({} if tied else {"tie_word_embeddings": False}))
    kw = dict(attn_sparsity=1e-6, topk_method=method, rotation=rotation, topk_scaled=scaled)
    if act == "silu":
        kw["mlp_sparsity"] = 1e-6
    calibrate(path, tmp_path / "a", data=[textfile], backend="cpu", tokens=2048, window=128, **kw)
    dense = edgesparse.load(path, backend="cpu")
    dense.set_ffn_mode("dense")
    sparse = edgesparse.load(path, backend="cpu", artifacts=tmp_path / "a")
    if act == "relu":
        sparse.set_ffn_mode("exact")
    assert sparse.model.attn_mode == "topk"
    if method == "rotated":   # untied: folded into embedding/lm_head, no run-time rotation
        assert (sparse.model.in_rotation is None) == (not tied)
    ids = torch.randint(1, 300, (1, 14), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(decode_logits(sparse, ids), decode_logits(dense, ids), atol=1e-4)


def test_topk_decode_matches_masked_reference(ckpt_factory, textfile, tmp_path):
    path = ckpt_factory("llama", "silu")
    calibrate(path, tmp_path / "a", data=[textfile], backend="cpu", tokens=2048, window=128,
              attn_sparsity=0.5, mlp_sparsity=0.5)
    llm = edgesparse.load(path, backend="cpu", artifacts=tmp_path / "a")
    m = llm.model
    ids = torch.randint(1, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m.forward(ids, m.new_cache(1, 10), torch.arange(10)[None], all_logits=True, sparse_prefill=True)
        cache = m.new_cache(1, 10)
        for t in range(10):
            step = m.forward(ids[:, t:t + 1], cache, torch.tensor([[t]]))
            assert torch.allclose(step, ref[:, t], atol=1e-4)
    # and it really is sparse: differs from the dense model
    m.set_attn_mode("dense")
    m.set_ffn_mode("dense")
    with torch.no_grad():
        dense = m.forward(ids, m.new_cache(1, 10), torch.arange(10)[None], all_logits=True, sparse_prefill=True)
    assert not torch.allclose(dense, ref, atol=1e-3)


def test_block_sizes_hit_the_model_level_sparsity():
    for s in (0.25, 0.4, 0.5):
        k_rot, k_unrot = block_topk_sizes(s, 576, 960, 576, 576)
        achieved = ((576 - k_rot) * 960 + (576 - k_unrot) * 576) / (576 * 960 + 576 * 576)
        assert abs(achieved - s) < 0.01 and (576 - k_unrot) / 576 > (576 - k_rot) / 576


def test_pca_rotation_is_orthogonal_and_sorted():
    x = torch.randn(500, 12) * torch.linspace(3, 0.1, 12)
    q = pca_rotation(x.double().T @ x.double())
    assert torch.allclose(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-10)
    var = (x.double() @ q).pow(2).mean(0)
    assert (var[:-1] >= var[1:] - 1e-6).all()


def test_bad_topk_options(ckpt_factory, llama_relu, textfile, tmp_path):
    with pytest.raises(edgesparse.InvalidOptionError, match="SwiGLU"):
        calibrate(llama_relu, tmp_path / "x", data=[textfile], backend="cpu", mlp_sparsity=0.4)
    with pytest.raises(edgesparse.InvalidOptionError, match="topk method"):
        calibrate(llama_relu, tmp_path / "x", data=[textfile], backend="cpu", attn_sparsity=0.4, topk_method="x")
    with pytest.raises(edgesparse.InvalidOptionError, match="attn_sparsity"):
        calibrate(llama_relu, tmp_path / "x", data=[textfile], backend="cpu", attn_sparsity=1.2)
    llm = edgesparse.load(ckpt_factory("llama", "silu"), backend="cpu")
    with pytest.raises(edgesparse.InvalidOptionError, match="Top-K artifacts"):
        llm.model.set_attn_mode("topk")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tied", [True, False])
def test_rotations_fold_into_the_float_checkpoint_then_quantise_once(ckpt_factory, textfile, tmp_path, tied):
    """q4_0 from a safetensors checkpoint: the folded matrices are made from the float values and
    stay q4_0 (no 8-bit fallback), and the rotated model at K = d tracks the float model about as
    well as the plain q4_0 model does (one rounding, not two)."""
    from edgesparse.backends.formats import QuantRows
    path = ckpt_factory("llama", "relu", **({} if tied else {"tie_word_embeddings": False}))
    calibrate(path, tmp_path / "a", data=[textfile], backend="cpu", tokens=2048, window=128,
              attn_sparsity=1e-6, rotation="global", weights="q4_0")
    ids = torch.randint(1, 300, (1, 14), generator=torch.Generator().manual_seed(0))
    ref = decode_logits(edgesparse.load(path, backend="cpu"), ids)
    plain = edgesparse.load(path, backend="cpu", weights="q4_0")
    assert plain.model.float_source is not None
    err_plain = _rel(decode_logits(plain, ids), ref)
    sparse = edgesparse.load(path, backend="cpu", weights="q4_0", artifacts=tmp_path / "a")
    m = sparse.model
    assert m.attn_mode == "topk"
    for layer in m.layers:
        for w in (layer.attn.qkv.weight_t, layer.attn.o.weight_t, layer.mlp.ffn.gate, layer.mlp.ffn.down_t):
            assert isinstance(w, QuantRows) and w.fmt == "q4_0"
    # the end rotations went into the embedding and the (8-bit) head, tied or not: under
    # block formats the head is its own matrix
    assert m.in_rotation is None and m.lm_head.weight.fmt == "q8_0"
    sparse.set_ffn_mode("exact")
    err_rot = _rel(decode_logits(sparse, ids), ref)
    assert err_rot < 1.5 * err_plain + 0.01, (err_rot, err_plain)


def test_without_a_float_source_folds_keep_eight_bits(ckpt_factory, textfile, tmp_path):
    """A model with no float copy (a GGUF file) folds into the de-quantised blocks: those are
    quantised a second time, so they keep 8 bits."""
    path = ckpt_factory("llama", "relu")
    calibrate(path, tmp_path / "a", data=[textfile], backend="cpu", tokens=2048, window=128,
              attn_sparsity=0.3, rotation="global", weights="q4_0")
    llm = edgesparse.load(path, backend="cpu", weights="q4_0")
    llm.model.float_source = None
    from edgesparse.sparsity import attach_artifacts
    attach_artifacts(llm.model, tmp_path / "a")
    layer = llm.model.layers[0]
    assert layer.attn.qkv.weight_t.fmt == "q8_0" and layer.mlp.ffn.gate.fmt == "q8_0"


def test_a_checkpoint_gone_since_load_is_a_clear_error(ckpt_factory, textfile, tmp_path):
    """Folding re-reads the float matrices: a checkpoint deleted since load is ModelFilesError."""
    import shutil
    from edgesparse.errors import ModelFilesError
    from edgesparse.sparsity import attach_artifacts
    path = ckpt_factory("llama", "relu")
    calibrate(path, tmp_path / "a", data=[textfile], backend="cpu", tokens=1024, window=128,
              attn_sparsity=0.3, rotation="global", weights="q4_0")
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    llm = edgesparse.load(copy, backend="cpu", weights="q4_0")
    shutil.rmtree(copy)
    with pytest.raises(ModelFilesError, match="cannot re-read"):
        attach_artifacts(llm.model, tmp_path / "a")


@pytest.mark.parametrize("method", ["rotated", "magnitude"])
def test_greedy_allocation_keeps_the_model_level_sparsity(ckpt_factory, textfile, tmp_path, method):
    """--topk-allocation greedy: per-layer K within target ± 0.1 whose mean block sparsity is
    the target, stored per layer in the manifest, installed per layer and decoded."""
    import json
    from edgesparse.sparsity.larosa import _block_ks
    path = ckpt_factory("llama", "silu", num_hidden_layers=4)
    rep = calibrate(path, tmp_path / "a", data=[textfile], backend="cpu", tokens=1024, window=128,
                    attn_sparsity=0.4, mlp_sparsity=0.3, topk_method=method, topk_allocation="greedy")
    ks = json.loads((tmp_path / "a" / "manifest.json").read_text())["topk"]["k"]
    assert rep["topk"]["allocation"] == "greedy" and len(ks) == 4
    llm = edgesparse.load(path, backend="cpu", artifacts=tmp_path / "a")
    spec = llm.model.spec
    for site, target in (("attn", 0.4), ("mlp", 0.3)):
        levels = [k[f"{site}_sparsity"] for k in ks]
        assert sum(levels) / 4 == pytest.approx(target) and all(target - 0.1 - 1e-9 <= v <= target + 0.1 + 1e-9
                                                                 for v in levels)
        for li, (k, layer) in enumerate(zip(ks, llm.model.layers)):
            names = ("qkv", "o") if site == "attn" else ("mlp", "down")
            assert (k[names[0]], k[names[1]]) == _block_ks(spec, site, levels[li])
            w = (layer.attn.qkv, layer.attn.o) if site == "attn" else (layer.mlp.gate_up, layer.mlp.down)
            assert (w[0].k, w[1].k) == (k[names[0]], k[names[1]])
    assert len(llm.generate("the history", max_new_tokens=4).token_ids) == 4
    with pytest.raises(edgesparse.InvalidOptionError, match="allocation"):
        calibrate(path, tmp_path / "b", data=[textfile], backend="cpu", tokens=1024, window=128,
                  attn_sparsity=0.4, topk_allocation="best")
