"""The vLLM plugin's MLP (edgesparse/vllm/mlp.py) on its own: weight loading into the executor's
layouts, and each path a step can take (one token, a batch's candidate union, the counted dense
fallback, prompt rows dense next to decode rows).  mlp.py does not import vLLM, so these run
in every venv; the real layer inputs come from the embedded model run by edgesparse's engine."""
import pytest
import torch
from safetensors.torch import load_file

import edgesparse
from edgesparse.backends import get_executor
from edgesparse.embedded import TINY
from edgesparse.errors import InvalidOptionError
from edgesparse.models.taps import observe
from edgesparse.sparsity.ffn import SparsityStats
from edgesparse.vllm.mlp import EdgeSparseMLP, Runtime, StepPlan

TINY_ARTS = TINY.parent / "tiny-artifacts"
LAYER = 2
PROMPTS = ["Once upon a time there was", "The cat sat on the mat and", "def f(x): return", "In 1990 the city"]


@pytest.fixture(scope="module")
def own():
    """The embedded model in predictor mode, and layer LAYER's MLP inputs at the last token of
    each prompt (what a decode step's MLP sees)."""
    llm = edgesparse.load("tiny", backend="cpu", dtype="fp32", artifacts=TINY_ARTS)
    rows = {}

    def grab(tap, h):
        if tap == f"layers.{LAYER}.mlp_in":
            rows[len(rows)] = h[0, -1].clone()
    m = llm.model
    with torch.inference_mode(), observe(m, grab):
        for p in PROMPTS:
            ids = torch.tensor([llm.tokenizer(p)["input_ids"]])
            m.forward(ids, m.new_cache(1, 64), torch.arange(ids.shape[1])[None])
    return llm, torch.stack([rows[i] for i in range(len(PROMPTS))])


def plugin_mlp(own, **runtime):
    """An EdgeSparseMLP loaded as vLLM loads it (names after vLLM's Llama mapping), with the
    own engine's predictor of the same layer."""
    llm, _ = own
    sd = load_file(str(TINY / "model.safetensors"))
    rt = Runtime(get_executor("cpu"), **runtime)
    mlp = EdgeSparseMLP(256, 1024, "relu", LAYER, rt)
    p = f"model.layers.{LAYER}.mlp."
    gate, up = sd[p + "gate_proj.weight"].float(), sd[p + "up_proj.weight"].float()
    gate.shard_id, up.shard_id = 0, 1
    loaded = mlp.load_weights([("gate_up_proj.weight", gate), ("gate_up_proj.weight", up),
                               ("down_proj.weight", sd[p + "down_proj.weight"].float())])
    assert loaded == {"gate", "up", "down_t"}
    mlp.finish_loading(sd[f"model.layers.{LAYER}.post_attention_layernorm.weight"].float())
    ref = llm.model.layers[LAYER].mlp
    mlp.es.predictor, mlp.es.calibrated_mode = ref.predictor, ref.calibrated_mode
    return mlp, ref


def alone(own, ref, x):
    llm, _ = own
    return torch.cat([ref.run(llm.model.ex, r.view(1, 1, -1), "predictor", SparsityStats()).view(1, -1) for r in x])


def test_weights_land_in_the_executor_layouts_once(own):
    mlp, ref = plugin_mlp(own)
    ffn = mlp.es.ffn
    for name in ("gate", "up", "down_t"):
        assert torch.equal(getattr(ffn, name), getattr(ref.ffn, name))
        assert getattr(mlp, name).data_ptr() == getattr(ffn, name).data_ptr()   # held once


def test_one_decode_token_is_the_own_engines_sparse_ffn(own):
    mlp, ref = plugin_mlp(own, mode="predictor")
    mlp.runtime.plan = StepPlan(None, True)
    x = own[1][:1]
    with torch.inference_mode():
        assert torch.equal(mlp(x), alone(own, ref, x))
    c = mlp.runtime.counters
    assert (c.single, c.union, c.fallback) == (1, 0, 0)
    assert mlp.runtime.stats.summary()["gate_sparsity"] > 0.5


def test_batch_union_keeps_each_tokens_own_predictions(own):
    mlp, ref = plugin_mlp(own, mode="predictor", break_even=1.0)
    mlp.runtime.plan = StepPlan(None, True)
    x = own[1]
    with torch.inference_mode():
        out = mlp(x)
        torch.testing.assert_close(out, alone(own, ref, x), rtol=1e-5, atol=1e-5)
    c = mlp.runtime.counters
    assert (c.union, c.union_tokens, c.fallback) == (1, 4, 0)
    assert 0 < c.union_share_sum < 1


def test_union_above_break_even_falls_back_to_dense_and_is_counted(own):
    mlp, _ = plugin_mlp(own, mode="predictor", break_even=0.0)
    mlp.runtime.plan = StepPlan(None, True)
    x = own[1]
    with torch.inference_mode():
        assert torch.equal(mlp(x), mlp.runtime.ex.ffn_dense(x, mlp.es.ffn))
    c = mlp.runtime.counters.as_dict()
    assert (c["fallback"], c["fallback_tokens"], c["union"]) == (1, 4, 0)
    assert c["mean_union_share"] > 0


def test_prompt_rows_dense_next_to_decode_rows_sparse(own):
    mlp, ref = plugin_mlp(own, mode="predictor", break_even=1.0)
    x = own[1]
    mlp.runtime.plan = StepPlan(torch.tensor([0, 3]), False)   # rows 1 and 2: a prompt chunk
    with torch.inference_mode():
        out = mlp(x)
        dense = mlp.runtime.ex.ffn_dense(x, mlp.es.ffn)
        torch.testing.assert_close(out[[0, 3]], alone(own, ref, x[[0, 3]]), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[[1, 2]], dense[[1, 2]])
    c = mlp.runtime.counters
    assert (c.prefill, c.union, c.union_tokens) == (1, 1, 2)


def test_no_plan_runs_dense(own):
    """Steps without attention metadata (vLLM's profiling and warm-up runs) are dense."""
    mlp, _ = plugin_mlp(own, mode="predictor")
    x = own[1]
    with torch.inference_mode():
        assert torch.equal(mlp(x), mlp.runtime.ex.ffn_dense(x, mlp.es.ffn))
    assert mlp.runtime.counters.union == mlp.runtime.counters.single == 0


@pytest.mark.parametrize("kw", [dict(mode="topk"), dict(break_even=1.5), dict(break_even=-0.1),
                                dict(break_even="half")])
def test_bad_options_raise_one_edgesparse_error(kw):
    with pytest.raises(InvalidOptionError) as e:
        Runtime(get_executor("cpu"), **kw)
    assert "\n" not in str(e.value)
