"""Per-layer Top-K allocation from measured block errors (``--topk-allocation measured``)."""
import json

import pytest
import torch

import edgesparse
from edgesparse.apps.cli import main
from edgesparse.sparsity import topk_allocation as ta
from edgesparse.sparsity.calibrate import calibrate
from edgesparse.sparsity.larosa import _block_ks

from conftest import DATA

LEVELS = [round(j * 0.05, 6) for j in range(19)]


@pytest.fixture(scope="module")
def textfile(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "wiki.txt"
    p.write_text((DATA / "wikitext-2-tok-valid.txt").read_text()[:60_000])
    return p


def _curves(slopes):
    """Convex error curves ``slope · level²`` on the grid, one per (layer, site)."""
    lv = torch.tensor(LEVELS, dtype=torch.float64)
    return {b: a * lv ** 2 for b, a in slopes.items()}


@pytest.mark.parametrize("targets,spread", [((0.4, 0.4), 0.2), ((0.25, 0.5), 0.1), ((0.5, 0.5), 0.45)])
def test_greedy_levels_hit_the_sparsity_exactly_within_bounds(targets, spread):
    g = torch.Generator().manual_seed(0)
    blocks = [(i, s) for i in range(6) for s in ("attn", "mlp")]
    curves = _curves({b: float(torch.rand(1, generator=g)) + 0.01 for b in blocks})
    params = {b: 300 if b[1] == "attn" else 1000 for b in blocks}
    tgt = {b: targets[b[1] == "mlp"] for b in blocks}
    lv = ta.greedy_levels(curves, params, tgt, LEVELS, spread)
    want = sum(params[b] * tgt[b] for b in blocks)
    assert sum(params[b] * lv[b] for b in blocks) == pytest.approx(want, rel=1e-9, abs=1e-9)
    for b in blocks:
        assert max(0, tgt[b] - spread) - 1e-12 <= lv[b] <= min(ta.MAX_LEVEL, tgt[b] + spread) + 1e-12
    assert ta.greedy_levels(curves, params, tgt, LEVELS, spread) == lv   # deterministic


def test_greedy_levels_move_sparsity_to_the_cheap_blocks():
    """Blocks whose error grows slowly take more of the budget; equal curves stay uniform."""
    blocks = [(i, "mlp") for i in range(4)]
    params = dict.fromkeys(blocks, 1000)
    tgt = dict.fromkeys(blocks, 0.4)
    lv = ta.greedy_levels(_curves({b: [1.0, 4.0, 1.0, 4.0][b[0]] for b in blocks}), params, tgt, LEVELS, 0.2)
    assert lv[(0, "mlp")] > 0.4 > lv[(1, "mlp")] and lv[(2, "mlp")] > 0.4 > lv[(3, "mlp")]
    same = ta.greedy_levels(_curves(dict.fromkeys(blocks, 1.0)), params, tgt, LEVELS, 0.2)
    assert all(v == pytest.approx(0.4) for v in same.values())


def test_greedy_levels_refuse_a_target_beyond_the_cap():
    b = (0, "mlp")
    with pytest.raises(edgesparse.InvalidOptionError, match="at most"):
        ta.greedy_levels(_curves({b: 1.0}), {b: 10}, {b: 0.95}, LEVELS)


@pytest.mark.parametrize("site", ["attn", "mlp"])
def test_block_runner_matches_the_model(ckpt_factory, textfile, site):
    """The recomputed dense block is the model's own block (attention: the residual's change
    across it, with RoPE and GQA), and its Top-K MLP matches the installed TopKMLP."""
    from edgesparse.eval.data import read_texts, token_windows
    from edgesparse.sparsity.larosa import install_topk, topk_sizes
    llm = edgesparse.load(ckpt_factory("llama", "silu", num_hidden_layers=2), backend="cpu")
    m = llm.model
    text, _ = read_texts([textfile])
    samples = ta.sample_blocks(m, token_windows(llm.tokenizer, text, 32, 128), 64)
    x = samples[f"layers.0.{site}_in"]
    assert x.shape[:2] == (2, 32)
    run = ta.block_runner(m, 0, site, x, None)
    after = samples["layers.0.mlp_in"] if site == "attn" else samples["layers.1.attn_in"]
    torch.testing.assert_close(run(10 ** 6, 10 ** 6), after - x, atol=2e-4, rtol=1e-3)
    if site == "mlp":   # the installed Top-K MLP at the 40% sizes
        ks = topk_sizes(m.spec, 0.4, 0.4)
        install_topk(m, ks)
        h = m.ex.rms_norm(x, m.layers[0].mlp.norm, m.spec.eps)
        torch.testing.assert_close(run(ks["mlp"], ks["down"]), m.layers[0].mlp.run(m.ex, h, "topk", None),
                                   atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("method", ["rotated", "magnitude"])
def test_measured_allocation_artifacts_load_and_decode(ckpt_factory, textfile, tmp_path, method):
    """calibrate --topk-allocation measured: per-layer K stored in the manifest, the requested
    parameter-weighted sparsity met exactly by the block levels (and by the K's up to their
    rounding), blocks within bounds, the same result twice, installed per layer and decoded
    through the block-quantised (native) decode path."""
    path = ckpt_factory("llama", "silu", num_hidden_layers=4)
    kw = dict(data=[textfile], backend="cpu", weights="q4_0", tokens=1024, window=128, attn_sparsity=0.4, mlp_sparsity=0.5,
              topk_method=method, topk_allocation="measured", topk_spread=0.15)
    rep = calibrate(path, tmp_path / "a", **kw)
    ks = json.loads((tmp_path / "a" / "manifest.json").read_text())["topk"]["k"]
    assert rep["topk"]["allocation"] == "measured" and len(ks) == 4
    assert rep["topk"]["measured"]["error_measured"] <= rep["topk"]["measured"]["error_uniform"] + 1e-12
    llm = edgesparse.load(path, backend="cpu", artifacts=tmp_path / "a", weights="q4_0")
    spec = llm.model.spec
    pa, pm = ta.block_params(spec, "attn"), ta.block_params(spec, "mlp")
    la, lm = [k["attn_sparsity"] for k in ks], [k["mlp_sparsity"] for k in ks]
    assert (pa * sum(la) + pm * sum(lm)) / (4 * (pa + pm)) == pytest.approx((0.4 * pa + 0.5 * pm) / (pa + pm), abs=1e-6)
    assert all(0.25 - 1e-9 <= v <= 0.55 + 1e-9 for v in la) and all(0.35 - 1e-9 <= v <= 0.65 + 1e-9 for v in lm)
    assert rep["topk"]["measured"]["sparsity"] == pytest.approx((0.4 * pa + 0.5 * pm) / (pa + pm), abs=0.02)
    for k, layer in zip(ks, llm.model.layers):
        assert (layer.attn.qkv.k, layer.attn.o.k) == (k["qkv"], k["o"]) == _block_ks(spec, "attn", k["attn_sparsity"])
        assert (layer.mlp.gate_up.k, layer.mlp.down.k) == (k["mlp"], k["down"]) == _block_ks(spec, "mlp", k["mlp_sparsity"])
    assert len(llm.generate("the history", max_new_tokens=4).token_ids) == 4
    calibrate(path, tmp_path / "b", **kw)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["topk"]["k"] == ks


def test_bad_allocation_options_exit_2(ckpt_factory, textfile, tmp_path, capsys):
    path = str(ckpt_factory("llama", "silu", num_hidden_layers=4))
    capsys.readouterr()   # the fixture's own progress output
    base = ["--quiet", "calibrate", path, "--data", str(textfile), "--tokens", "1024", "--attn-sparsity", "0.4"]
    for extra in (["--topk-allocation", "best"], ["--topk-spread", "0.1"],
                  ["--topk-allocation", "measured", "--topk-spread", "0"],
                  ["--topk-allocation", "measured", "--attn-sparsity", "0.95"],
                  ["--topk-allocation", "measured", "--topk-scaled"]):
        assert main(base + ["-o", str(tmp_path / "x")] + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("edgesparse: error:") and len(err.strip().splitlines()) == 1


def test_final_hidden_errors_grow_with_sparsity(ckpt_factory, textfile):
    """Each block's final-hidden error is ~0 at K = all-but-rounding and grows with its sparsity;
    blocks of every layer are measured, each alone."""
    from edgesparse.eval.data import read_texts, token_windows
    llm = edgesparse.load(ckpt_factory("llama", "silu", num_hidden_layers=2), backend="cpu")
    text, _ = read_texts([textfile])
    samples = ta.sample_blocks(llm.model, token_windows(llm.tokenizer, text, 32, 128), 64)
    errs = [ta.final_hidden_errors(llm.model, samples, None, {"attn": s, "mlp": s}, 64) for s in (1e-6, 0.3, 0.6)]
    assert sorted(errs[0]) == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    for b in errs[0]:
        assert errs[0][b] < 1e-9 < errs[1][b] < errs[2][b]
