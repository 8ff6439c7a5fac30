"""calibrate -> artifacts -> load: predictor mode end to end, and every way it can go wrong."""
import json
import shutil

import pytest
import torch

import edgesparse
from edgesparse.sparsity.artifacts import TENSORS, MANIFEST
from edgesparse.sparsity.calibrate import calibrate
from edgesparse.eval.perplexity import eval_ppl

from conftest import DATA


@pytest.fixture(scope="module")
def textfile(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    p.write_text((DATA / "tinyshakespeare.txt").read_text()[:60_000])
    return p


@pytest.fixture(scope="module")
def arts(llama_relu, textfile, tmp_path_factory):
    out = tmp_path_factory.mktemp("arts") / "a"
    rep = calibrate(llama_relu, out, data=[textfile], backend="cpu", tokens=4096, rank=16,
                    target_sparsity=0.3, window=128)
    return out, rep


def test_report_and_manifest(arts):
    out, rep = arts
    m = json.loads((out / MANIFEST).read_text())
    assert m["format_version"] == 1 and m["calibration"]["rank"] == 16
    assert m["calibration"]["predictor_factors"] == "int8-rows"
    assert m["calibration"]["svd_tokens"] + m["calibration"]["threshold_tokens"] == m["calibration"]["tokens"]
    assert len(rep["layers"]) == 2
    for layer in rep["layers"]:
        assert abs(layer["gate_sparsity"] - 0.3) < 0.02
        assert 0 < layer["recall"] <= 1 and 0 < layer["precision"] <= 1


def test_predictor_decode_equals_masked_reference(llama_relu, arts):
    """The gather path (decode, batch 1 and 3) computes exactly what the masked reference does."""
    llm = edgesparse.load(llama_relu, backend="cpu", artifacts=arts[0])
    m = llm.model
    assert m.ffn_mode == "predictor"
    ids = torch.randint(1, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    ref_cache = m.new_cache(3, 12)
    with torch.no_grad():
        ref = m.forward(ids, ref_cache, torch.arange(12).expand(3, 12), all_logits=True, sparse_prefill=True)
        for b in (1, 3):
            cache = m.new_cache(b, 12)
            for t in range(12):
                step = m.forward(ids[:b, t:t + 1], cache, torch.full((b, 1), t))
                assert torch.allclose(step, ref[:b, t], atol=1e-4), (b, t)


def test_int8_predictor_factors_are_packed_on_cpu_and_optional(llama_relu, arts, textfile, tmp_path):
    p = edgesparse.load(llama_relu, backend="cpu", artifacts=arts[0]).model.layers[0].mlp.predictor
    assert p.packed is not None and p.packed[0].dtype == torch.int8 and p.packed[0].shape == p.a.t().shape
    calibrate(llama_relu, tmp_path / "f", data=[textfile], backend="cpu", tokens=1024, rank=16, window=128,
              target_sparsity=0.3, int8_predictor=False)
    assert json.loads((tmp_path / "f" / MANIFEST).read_text())["calibration"]["predictor_factors"] == "float"
    assert edgesparse.load(llama_relu, backend="cpu", artifacts=tmp_path / "f").model.layers[0].mlp.predictor.packed is None


def test_sparse_ppl_reports_and_gap(llama_relu, arts, textfile):
    llm = edgesparse.load(llama_relu, backend="cpu", artifacts=arts[0])
    out = eval_ppl(llm, [textfile], window=64, max_tokens=1024)
    for k in ("dense_ppl", "sparse_ppl", "ppl_gap_pct", "gate_sparsity", "ffn_sparsity", "natural_sparsity",
              "predictor_recall", "tokens"):
        assert k in out
    assert out["ffn_sparsity"] >= out["natural_sparsity"] - 1e-9
    assert 0.2 < out["gate_sparsity"] < 0.4
    exact = eval_ppl(llm, [textfile], window=64, max_tokens=1024, sparse_mode="exact")
    assert abs(exact["ppl_gap_pct"]) < 1e-3 and exact["predictor_recall"] == 1.0


def test_fingerprint_mismatch_is_refused(ckpt_factory, arts):
    other = ckpt_factory("llama", "relu", seed=5)
    with pytest.raises(edgesparse.FingerprintMismatchError, match="different weights"):
        edgesparse.load(other, backend="cpu", artifacts=arts[0])
    wider = ckpt_factory("llama", "relu", intermediate_size=192)
    with pytest.raises(edgesparse.FingerprintMismatchError, match="intermediate"):
        edgesparse.load(wider, backend="cpu", artifacts=arts[0])


def test_corrupted_artifacts_are_refused(llama_relu, arts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(arts[0], bad)
    data = bytearray((bad / TENSORS).read_bytes())
    data[-10] ^= 0xFF
    (bad / TENSORS).write_bytes(bytes(data))
    with pytest.raises(edgesparse.ArtifactError, match="corrupted"):
        edgesparse.load(llama_relu, backend="cpu", artifacts=bad)
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(edgesparse.ArtifactError, match="corrupted manifest"):
        edgesparse.load(llama_relu, backend="cpu", artifacts=bad)
    with pytest.raises(edgesparse.ArtifactError, match="not an artifact dir"):
        edgesparse.load(llama_relu, backend="cpu", artifacts=tmp_path)


def test_interrupted_write_leaves_previous_artifacts(llama_relu, arts, textfile, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    shutil.copytree(arts[0], out)
    before = (out / MANIFEST).read_text()
    import edgesparse.sparsity.artifacts as A

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(A.json, "dumps", boom)
    with pytest.raises(KeyboardInterrupt):
        calibrate(llama_relu, out, data=[textfile], backend="cpu", tokens=1024, rank=8, window=128)
    assert (out / MANIFEST).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]  # no temp dirs left behind


@pytest.mark.parametrize("kw,err,msg", [
    (dict(target_sparsity=1.5), edgesparse.InvalidOptionError, "target_sparsity"),
    (dict(target_recall=0.9, target_sparsity=0.5), edgesparse.InvalidOptionError, "not both"),
    (dict(rank=10_000), edgesparse.InvalidOptionError, "rank"),
    (dict(tokens=10), edgesparse.InvalidOptionError, "tokens"),
])
def test_bad_calibration_options(llama_relu, textfile, tmp_path, kw, err, msg):
    with pytest.raises(err, match=msg):
        calibrate(llama_relu, tmp_path / "x", data=[textfile], backend="cpu", window=128, **kw)
    assert not (tmp_path / "x").exists()


def test_empty_or_missing_data(llama_relu, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(edgesparse.EmptyDataError):
        calibrate(llama_relu, tmp_path / "x", data=[empty], backend="cpu")
    with pytest.raises(edgesparse.ModelFilesError, match="cannot read"):
        calibrate(llama_relu, tmp_path / "x", data=[tmp_path / "missing.txt"], backend="cpu")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_swiglu_model_with_no_flags_gets_the_default_topk(ckpt_factory, textfile, tmp_path, family):
    """No predictors for a SwiGLU FFN: calibrate with no flags builds rotated Top-K at the
    documented default level and says so in its report."""
    from edgesparse.sparsity.calibrate import DEFAULT_SWIGLU_TOPK
    ck = ckpt_factory(family, "silu")
    rep = calibrate(ck, tmp_path / "x", data=[textfile], backend="cpu", tokens=1024, window=128)
    assert rep["defaults"]["attn_sparsity"] == rep["defaults"]["mlp_sparsity"] == DEFAULT_SWIGLU_TOPK
    assert rep["topk"]["method"] == "rotated" and not rep["layers"]
    llm = edgesparse.load(ck, backend="cpu", artifacts=tmp_path / "x")
    assert llm.model.ffn_mode == "topk" and llm.model.attn_mode == "topk"
    kept = llm.model.sparsity_in_use()["topk_kept"]
    assert set(kept) == {"qkv", "o", "gate_up", "down"} and all(0 < v < 1 for v in kept.values())


@pytest.mark.parametrize("over", [dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
                                  dict(hidden_size=96, intermediate_size=320, num_attention_heads=3,
                                       num_key_value_heads=1)], ids=["d64-gqa2", "d96-gqa3"])
def test_per_layer_rank_and_mode_by_the_cost_model(ckpt_factory, textfile, tmp_path, over):
    """Default calibration (no --rank, a recall target) searches each layer's rank over the
    grid and keeps the cheapest of predictor, exact and dense; the manifest says which."""
    from edgesparse.predictors.cost import rank_grid
    path = ckpt_factory("llama", "relu", **over)
    rep = calibrate(path, tmp_path / "a", data=[textfile], backend="cpu", tokens=4096, window=128)
    d, f = over["hidden_size"], over.get("intermediate_size", 128)
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert m["calibration"]["rank"] == "per layer"
    for layer in m["layers"]:
        assert layer["mode"] == min(layer["bytes"], key=layer["bytes"].get)   # a recall target: cheapest
        tried = {int(r): v["bytes"] for r, v in layer["ranks_tried"].items()}
        assert sorted(tried) == rank_grid(d, f)
        if layer["mode"] == "predictor":
            assert layer["rank"] == min(tried, key=tried.get)
            assert layer["recall"] >= 0.985 and layer["predictor_bytes"] > 0
        else:
            assert layer["rank"] == 0 and layer["gate_sparsity"] == 0
    assert rep["ffn_bytes_vs_dense"] == pytest.approx(
        sum(l["bytes"][l["mode"]] for l in m["layers"]) / sum(l["bytes"]["dense"] for l in m["layers"]), abs=1e-3)
    llm = edgesparse.load(path, backend="cpu", artifacts=tmp_path / "a")
    assert llm.model.ffn_mode == "predictor"
    assert len(llm.generate("to be or not", max_new_tokens=4).token_ids) == 4


def test_layers_left_exact_or_dense_by_calibration(llama_relu, arts):
    """A layer the cost model leaves exact runs every gate row; one left dense runs the dense
    FFN: with both, "predictor" mode computes what dense mode does, native step or not."""
    from edgesparse.sparsity import svd_predictor
    from edgesparse.sparsity.artifacts import load_artifacts
    llm = edgesparse.load(llama_relu, backend="cpu", dtype="fp32")
    m = llm.model
    tensors = {k: v for k, v in load_artifacts(arts[0]).tensors.items() if not k.startswith(("layers.0.", "layers.1."))}
    svd_predictor.apply(m, tensors, [dict(layer=0, mode="exact"), dict(layer=1, mode="dense")])
    m.set_ffn_mode("predictor")
    ids = torch.tensor([[5, 9, 13, 17]])
    with torch.no_grad():
        out = {}
        for mode in ("predictor", "dense"):
            m.set_ffn_mode(mode)
            m.stats.reset()
            cache = m.new_cache(1, 8)
            m.forward(ids, cache, torch.arange(4)[None])
            out[mode] = m.forward(torch.tensor([[3]]), cache, torch.tensor([[4]]))
            if mode == "predictor":
                s0, s1 = m.stats.layer(0), m.stats.layer(1)
                assert s0.tokens == 1 and s0.gate_rows == m.layers[0].mlp.ffn.gate.shape[0]
                assert s1.tokens == 0
    assert torch.allclose(out["predictor"], out["dense"], atol=1e-4)
    with pytest.raises(edgesparse.ArtifactError, match="unknown calibrated mode"):
        svd_predictor.apply(m, tensors, [dict(layer=0, mode="sometimes")])
