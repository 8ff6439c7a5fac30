"""The fixed-shape decode step a device graph replays (models/static_step.py) against eager
decode: logits every step, greedy tokens, sparsity counts, the sliding window; that every
step runs the same ops on the same shapes whatever the position (what a CUDA graph needs);
and a real CUDA graph replay where a GPU is present."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import edgesparse
from edgesparse.backends.cuda import CudaExecutor
from edgesparse.errors import InvalidOptionError
from edgesparse.sampling import SamplingParams

GPU = torch.cuda.is_available()


def _load(path, monkeypatch, executor=None, **kw):
    if executor is not None:
        monkeypatch.setattr("edgesparse.loader.get_executor", lambda name="auto": executor())
    return edgesparse.load(path, backend="cpu", **kw)


def _steps(m, ids, n, graph):
    """Logits of the prompt then of ``n`` greedy decode steps."""
    m.graph_decode = graph
    cache = m.new_cache(1, ids.shape[1] + n + 1)
    out = [m.forward(ids, cache, torch.arange(ids.shape[1], device=ids.device)[None])]
    for i in range(n):
        nxt = out[-1].argmax(-1, keepdim=True)
        out.append(m.forward(nxt, cache, torch.tensor([[ids.shape[1] + i]], device=ids.device)))
    m.graph_decode = False
    return out


@pytest.mark.parametrize("family,over", [("llama", {}), ("mistral", {}), ("qwen2", {})])
def test_static_step_equals_eager_decode(ckpt_factory, monkeypatch, family, over):
    llm = _load(ckpt_factory(family, "relu", **over), monkeypatch)
    m = llm.model
    ids = torch.randint(1, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = _steps(m, ids, 14, graph=False)    # 23 tokens: past mistral's window of 12
        static = _steps(m, ids, 14, graph=True)
    for i, (a, b) in enumerate(zip(eager, static)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"step {i}")
    assert [int(x.argmax()) for x in eager] == [int(x.argmax()) for x in static]


def test_static_step_on_the_triton_kernels_keeps_tokens_and_counts(llama_relu, monkeypatch, tmp_path):
    """A calibrated ReGLU model on the cuda executor's sync-free kernels (interpreted here: a
    small model, since the interpreter runs every program in Python)."""
    from conftest import TEXT
    data = tmp_path / "calib.txt"
    data.write_text(TEXT * 20)
    arts = edgesparse.calibrate(llama_relu, tmp_path / "a", data=[data], backend="cpu", tokens=512, window=64,
                                rank=16)["artifacts"]
    llm = _load(llama_relu, monkeypatch, lambda: CudaExecutor("cuda" if GPU else "cpu", use_triton=True),
                artifacts=arts)
    assert llm.model.ffn_mode == "predictor"
    p = SamplingParams(max_new_tokens=8, stop_token_ids=[])
    ids = llm.engine.encode("The quick brown fox")
    llm.model.stats.reset()
    eager = llm.engine.generate_ids([ids], p)[0].token_ids
    eager_stats = llm.model.stats.summary()
    llm.model.stats.reset()
    llm.model.graph_decode = True
    static = llm.engine.generate_ids([ids], p)[0].token_ids
    assert static == eager
    got = llm.model.stats.summary()
    assert got["gate_sparsity"] == pytest.approx(eager_stats["gate_sparsity"]) and got["gate_sparsity"] > 0
    assert got["ffn_sparsity"] == pytest.approx(eager_stats["ffn_sparsity"]) and got["ffn_sparsity"] > 0


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return out


def test_every_step_runs_the_same_ops_on_the_same_shapes(llama_relu, monkeypatch):
    """What capture needs, checked without a GPU: the step's op sequence and every shape are
    the same at every position, and nothing reads a value back to the host."""
    llm = _load(llama_relu, monkeypatch)
    llm.set_ffn_mode("dense")
    m = llm.model
    ids = torch.randint(1, 300, (1, 5), generator=torch.Generator().manual_seed(0))
    cache = m.new_cache(1, 16)
    m.forward(ids, cache, torch.arange(5)[None])
    step = m._static_step(cache, "dense", False)
    with torch.no_grad():
        step._step()           # the warm-up a capture follows (it allocates the logits buffer)
    logs = []
    for pos in (5, 6, 11):
        step.position.fill_(pos)
        step.token.fill_(pos + 3)
        log = _OpLog()
        with torch.no_grad(), log:
            step._step()       # what a capture records (run() adds the host-side copies)
        logs.append(log.ops)
    assert logs[0] == logs[1] == logs[2] and len(logs[0]) > 20
    names = {op for op, _ in logs[0]}
    assert not names & {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}


def test_graph_decode_is_refused_where_nothing_captures(llama_relu):
    llm = edgesparse.load(llama_relu, backend="cpu")
    with pytest.raises(InvalidOptionError, match="graph decode"):
        llm.set_graph_decode(True)
    llm.set_graph_decode(False)
    assert llm.model.graph_decode is False


@pytest.mark.skipif(not GPU, reason="a CUDA graph needs a GPU (the eager twin of this test runs above)")
@pytest.mark.parametrize("mode", ["dense", "exact", "predictor"])
def test_cuda_graph_replay_equals_eager_on_the_gpu(mode):
    from edgesparse.embedded import TINY_ARTIFACTS
    llm = edgesparse.load("tiny", backend="cuda", artifacts=TINY_ARTIFACTS)
    llm.set_ffn_mode(mode)
    p = SamplingParams(max_new_tokens=24, stop_token_ids=[])
    ids = llm.engine.encode("The history of the city")
    eager = llm.engine.generate_ids([ids], p)[0].token_ids
    llm.set_graph_decode(True)
    assert llm.engine.generate_ids([ids], p)[0].token_ids == eager
    assert llm.engine.generate_ids([ids], p)[0].token_ids == eager   # a new cache: captured again


@pytest.mark.parametrize("argv", [["generate", "tiny", "--prompt", "hi", "--graph", "--backend", "cpu"],
                                  ["bench", "decode", "--synthetic", "tinyllama-1.1b", "--graph", "--backend", "cpu"]])
def test_graph_flag_on_the_cpu_is_a_one_line_error(argv):
    import subprocess
    import sys
    if argv[0] == "bench":   # refused before the 1.1B model is built
        pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, "-m", "edgesparse", *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "graph" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
