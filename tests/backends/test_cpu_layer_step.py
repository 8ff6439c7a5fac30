"""The cpu backend's one-call decoder layer (``layer_step.py``, ``csrc/decode_layer.c``)
against the composed executor ops it replaces: the same logits and greedy tokens for every
weight format, activation dtype, FFN mode and attention mode it covers, and the composed
path wherever it does not apply."""
from pathlib import Path

import pytest
import torch

import edgesparse
from edgesparse.backends.cpu import layer_step, native

from conftest import TEXT

pytestmark = pytest.mark.skipif(native.lib() is None, reason=f"native kernels: {native.status()}")
PROMPT = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 33]])


@pytest.fixture
def calls(monkeypatch):
    """How many layers ran through the native step (one layer a call, or all layers a call)."""
    n = {"layers": 0, "stacks": 0}
    real, real_all = layer_step.run, layer_step.run_all

    def counted(*a, **kw):
        n["layers"] += 1
        return real(*a, **kw)

    def counted_all(stack, *a, **kw):
        n["layers"] += len(stack.plans)
        n["stacks"] += 1
        return real_all(stack, *a, **kw)
    monkeypatch.setattr(layer_step, "run", counted)
    monkeypatch.setattr(layer_step, "run_all", counted_all)
    return n


def _decode(model, fused: bool, steps: int = 6):
    """Greedy tokens and every decode step's logits, fused or composed."""
    model.fused_decode = fused
    model.stats.reset()
    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        logits = model.forward(PROMPT, cache, torch.arange(8)[None])
        toks, all_logits = [], []
        for t in range(steps):
            tok = int(logits.argmax(-1))
            toks.append(tok)
            logits = model.forward(torch.tensor([[tok]]), cache, torch.tensor([[8 + t]]))
            all_logits.append(logits[0].float())
    model.fused_decode = True
    return toks, torch.stack(all_logits), model.stats.summary()


def _same(model, calls, n_layers):
    want_toks, want, want_stats = _decode(model, fused=False)
    assert calls["layers"] == 0
    got_toks, got, got_stats = _decode(model, fused=True)
    assert calls["layers"] == 6 * n_layers   # every decode step, every layer, went native
    assert got_toks == want_toks
    # the same kernels in the same order; only the order of the threads' partial sums differs
    assert ((got - want).norm() / want.norm()).item() < 1e-3
    assert got_stats == pytest.approx(want_stats, abs=0.02)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["dense", "exact"])
def test_tiny_model_formats_dtypes_and_ffn_modes(fmt, dtype, mode, calls):
    llm = edgesparse.load("tiny", backend="cpu", dtype=dtype, weights=fmt)
    llm.model.set_ffn_mode(mode)
    _same(llm.model, calls, len(llm.model.layers))


def test_swiglu_qwen2_with_biases(ckpt_factory, calls):
    """SiLU FFN, q/k/v biases (Qwen2), an odd block count (d = 96: three blocks)."""
    path = ckpt_factory("qwen2", "silu", hidden_size=96, intermediate_size=224, num_attention_heads=3,
                        num_key_value_heads=1)
    llm = edgesparse.load(path, backend="cpu", dtype="fp32", weights="q8_0")
    assert llm.model.layers[0].attn.qkv.bias is not None
    _same(llm.model, calls, len(llm.model.layers))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, ckpt_factory):
    """A ReGLU checkpoint calibrated at q8_0: predictors and 40% Top-K attention under one
    global rotation (no residual adapters)."""
    path = ckpt_factory("llama", "relu")
    tmp = tmp_path_factory.mktemp("calib")
    data = tmp / "calib.txt"
    data.write_text(TEXT * 20)
    rep = edgesparse.calibrate(path, tmp / "a", data=[data], backend="cpu", tokens=512, window=64, weights="q8_0",
                               attn_sparsity=0.4, rotation="global")
    return path, rep["artifacts"]


def test_predictor_and_topk_attention(calibrated, calls):
    path, arts = calibrated
    llm = edgesparse.load(path, backend="cpu", weights="q8_0", artifacts=arts)
    m = llm.model
    assert m.ffn_mode == "predictor" and m.attn_mode == "topk"
    _same(m, calls, len(m.layers))
    with m.modes(attn="dense"):   # a Top-K layer run densely is left to the composed ops
        _decode(m, fused=True)
    assert calls["layers"] == 6 * len(m.layers)


@pytest.fixture(scope="module")
def swiglu_topk(tmp_path_factory, ckpt_factory):
    """A SwiGLU checkpoint with 40% rotated Top-K in attention and MLP: under the default
    ``shared`` rotation a residual adapter follows every layer's MLP, under ``per-site`` its
    attention too."""
    path = ckpt_factory("llama", "silu", intermediate_size=176)   # gate|up: 11 blocks a row
    tmp = tmp_path_factory.mktemp("calib_swiglu")
    data = tmp / "calib.txt"
    data.write_text(TEXT * 20)
    made = {}

    def get(fmt, dtype, rotation="shared"):   # artifacts are fitted to one weight format and dtype
        key = (fmt, dtype, rotation)
        if key not in made:
            made[key] = edgesparse.calibrate(
                path, tmp / "-".join(key), data=[data], backend="cpu", tokens=512, window=64, weights=fmt,
                dtype=dtype, attn_sparsity=0.4, mlp_sparsity=0.4, rotation=rotation)["artifacts"]
        return path, made[key]
    return get


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_topk_swiglu_with_residual_adapters(swiglu_topk, fmt, dtype, calls):
    path, arts = swiglu_topk(fmt, dtype)
    llm = edgesparse.load(path, backend="cpu", dtype=dtype, weights=fmt, artifacts=arts)
    m = llm.model
    assert m.ffn_mode == "topk" and m.attn_mode == "topk"
    assert all(layer.adapter is not None for layer in m.layers[:-1])
    _same(m, calls, len(m.layers))
    with m.modes(ffn="dense"):   # a Top-K MLP run densely is left to the composed ops
        _decode(m, fused=True)
    assert calls["layers"] == 6 * len(m.layers)


def test_per_site_rotations_adapt_after_attention_too(swiglu_topk, calls):
    path, arts = swiglu_topk("q4_0", "bf16", "per-site")
    m = edgesparse.load(path, backend="cpu", dtype="bf16", weights="q4_0", artifacts=arts).model
    assert all(layer.attn.adapter is not None for layer in m.layers)
    _same(m, calls, len(m.layers))


def test_swiglu_stacked_is_the_torch_activation():
    """The native activation both paths use matches the torch ops to the last bit on most
    entries, and within one rounding on every entry (libm's expf vs torch's)."""
    from edgesparse.backends.interface import Executor
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n, f in ((1, 1), (1, 7), (3, 200)):
            gu = (torch.randn(n, 2 * f, generator=g) * 4).to(dtype)
            got, want = native.swiglu(gu), Executor.swiglu_stacked(None, gu)
            assert got.shape == (n, f) and got.dtype == dtype
            tol = 1e-6 if dtype == torch.float32 else 8e-3
            assert torch.allclose(got.float(), want.float(), rtol=tol, atol=1e-6)
            assert (got == want).float().mean() > 0.95


def test_not_covered_layers_are_composed(ckpt_factory, calls):
    """Float weights take the composed ops."""
    llm = edgesparse.load("tiny", backend="cpu", dtype="bf16")
    toks, _, _ = _decode(llm.model, fused=True)
    assert calls["layers"] == 0 and len(toks) == 6
    step = llm.model._layer_step(0, llm.model.layers[0], "dense", False)
    cache = llm.model.new_cache(1, 8)
    assert layer_step.build(step, cache.k[0][0], torch.bfloat16) is None


def test_layer_by_layer_equals_all_layers_in_one_call(calls, monkeypatch):
    """Executor.decode_layers (one C call a token) and decode_layer (one a layer) are the same
    kernels: identical logits."""
    llm = edgesparse.load("tiny", backend="cpu", weights="q4_0")
    toks, all_layers, _ = _decode(llm.model, fused=True)
    assert calls["stacks"] == 6
    monkeypatch.setattr(type(llm.model.ex), "decode_layers", lambda self, *a: None)
    toks2, by_layer, _ = _decode(llm.model, fused=True)
    assert calls["stacks"] == 6 and calls["layers"] == 12 * len(llm.model.layers)
    assert toks == toks2 and torch.equal(all_layers, by_layer)


def test_generate_is_token_identical(calls):
    llm = edgesparse.load("tiny", backend="cpu", weights="q4_0")
    fused = llm.generate("The history of the city", max_new_tokens=12).token_ids
    assert calls["layers"] > 0
    llm.model.fused_decode = False
    assert llm.generate("The history of the city", max_new_tokens=12).token_ids == fused


SMOLLM2 = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not SMOLLM2.exists(), reason="run bench/get_smollm2.py first")
def test_smollm2_q4_1_greedy_text_is_identical(calls):
    """A real model in its own Q4_1 blocks (the down projection too, row-major: TransposedRows;
    SiLU): 40 greedy tokens through the native layers equal the composed ops' tokens."""
    from edgesparse.backends.formats import TransposedRows
    llm = edgesparse.load(SMOLLM2, backend="cpu")
    down = llm.model.layers[0].mlp.ffn.down_t
    assert isinstance(down, TransposedRows) and down.fmt == "q4_1" and down.shape == (1536, 576)
    kw = dict(max_new_tokens=40, stop_token_ids=[])
    fused = llm.generate("The capital of France is", **kw).token_ids
    assert calls["layers"] >= 39 * len(llm.model.layers)
    llm.model.fused_decode = False
    assert llm.generate("The capital of France is", **kw).token_ids == fused
