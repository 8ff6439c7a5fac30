"""The cpu backend's batched decode step (``Executor.decode_layers_rows``: one native call for
B sequences, ``es_decode_layers_rows``) against the single-sequence native step it batches:
each sequence's logits are bit-identical to its own step alone, for every weight format,
activation dtype and FFN / attention mode the native step covers, with caches of different
lengths and sequences at different positions; float weights fall back to the composed ops."""
import pytest
import torch

import edgesparse
from edgesparse.backends.cpu import layer_step, native

from test_cpu_layer_step import calibrated, swiglu_topk  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.skipif(native.lib() is None, reason=f"native kernels: {native.status()}")
LENGTHS = (8, 3, 13)   # prompt lengths: each sequence at its own position, in its own cache size


@pytest.fixture
def batched_calls(monkeypatch):
    n = {"rows": 0}
    real = layer_step.run_rows

    def counted(*a, **kw):
        n["rows"] += 1
        return real(*a, **kw)
    monkeypatch.setattr(layer_step, "run_rows", counted)
    return n


def _steps(model, batched: bool, steps: int = 5, lengths=LENGTHS):
    """Greedy decode of ``len(lengths)`` random prompts, batched (``decode_rows``) or each
    sequence's own single-token forward; every step's logits and the sparsity counters."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 300, (1, n), generator=g) for n in lengths]
    model.stats.reset()
    out = []
    with torch.inference_mode():
        caches = [model.new_cache(1, n + steps + 4 * i) for i, n in enumerate(lengths)]
        logits = torch.cat([model.forward(p, c, torch.arange(p.shape[1])[None]) for p, c in zip(prompts, caches)])
        for _ in range(steps):
            toks = logits.argmax(-1).tolist()
            if batched:
                logits = model.decode_rows(toks, caches, [c.length for c in caches])
            else:
                logits = torch.cat([model.forward(torch.tensor([[t]]), c, torch.tensor([[c.length]]))
                                    for t, c in zip(toks, caches)])
            out.append(logits.float())
    return torch.stack(out), model.stats.summary()


def _rows_equal_alone(model, batched_calls, lengths=LENGTHS):
    want, want_stats = _steps(model, batched=False, lengths=lengths)
    assert batched_calls["rows"] == 0
    got, got_stats = _steps(model, batched=True, lengths=lengths)
    assert batched_calls["rows"] == 5          # every batched step was one native call
    assert torch.equal(got, want)             # bit for bit: GEMM rows equal the GEMVs
    assert got_stats == want_stats


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["dense", "exact"])
def test_tiny_formats_dtypes_and_ffn_modes(fmt, dtype, mode, batched_calls):
    llm = edgesparse.load("tiny", backend="cpu", dtype=dtype, weights=fmt)
    llm.model.set_ffn_mode(mode)
    _rows_equal_alone(llm.model, batched_calls)


@pytest.mark.parametrize("lengths", [(5,), (4, 9), tuple(range(2, 10))])
def test_one_some_and_many_rows(lengths, batched_calls):
    llm = edgesparse.load("tiny", backend="cpu", dtype="bf16", weights="q4_0")
    _rows_equal_alone(llm.model, batched_calls, lengths)


def test_qwen2_biases_and_odd_blocks(ckpt_factory, batched_calls):
    path = ckpt_factory("qwen2", "silu", hidden_size=96, intermediate_size=224, num_attention_heads=3,
                        num_key_value_heads=1)
    _rows_equal_alone(edgesparse.load(path, backend="cpu", dtype="fp32", weights="q8_0").model, batched_calls)


def test_predictor_sparse_ffn_and_topk_attention(calibrated, batched_calls):  # noqa: F811
    """Each token keeps its own predicted rows and its own Top-K selection."""
    path, arts = calibrated
    m = edgesparse.load(path, backend="cpu", weights="q8_0", artifacts=arts).model
    assert m.ffn_mode == "predictor" and m.attn_mode == "topk"
    _rows_equal_alone(m, batched_calls)


@pytest.mark.parametrize("rotation", ["shared", "per-site"])
def test_topk_swiglu_with_residual_adapters(swiglu_topk, rotation, batched_calls):  # noqa: F811
    path, arts = swiglu_topk("q4_0", "bf16", rotation)
    m = edgesparse.load(path, backend="cpu", dtype="bf16", weights="q4_0", artifacts=arts).model
    assert m.ffn_mode == "topk"
    _rows_equal_alone(m, batched_calls)


def test_float_weights_compose_the_batched_step(batched_calls):
    m = edgesparse.load("tiny", backend="cpu", dtype="bf16").model
    got, _ = _steps(m, batched=True)
    assert batched_calls["rows"] == 0 and got.shape[:2] == (5, len(LENGTHS))
