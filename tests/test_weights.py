"""Weight formats at load: ``weights=`` / ``--weights`` (q8_0, q4_0) end to end."""
import json
import subprocess
import sys

import pytest
import torch

import edgesparse
from edgesparse.backends.formats import QuantRows
from edgesparse.errors import FingerprintMismatchError, InvalidOptionError

from conftest import TEXT

IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 33]])


def _logits(llm):
    m = llm.model
    with torch.inference_mode(), m.modes(ffn="dense"):
        cache = m.new_cache(1, 12)
        m.forward(IDS, cache, torch.arange(8)[None])
        return m.forward(torch.tensor([[5]]), cache, torch.tensor([[8]]))[0]   # a decode step: native kernels


@pytest.mark.parametrize("fmt, tol", [("q8_0", 0.03), ("q4_0", 0.15)])
def test_quantised_model_tracks_the_float_one(fmt, tol):
    ref = _logits(edgesparse.load("tiny", backend="cpu", dtype="fp32"))
    llm = edgesparse.load("tiny", backend="cpu", dtype="fp32", weights=fmt)
    layer = llm.model.layers[0]
    assert isinstance(layer.mlp.ffn.gate, QuantRows) and layer.mlp.ffn.gate.fmt == fmt
    assert llm.model.lm_head.weight.fmt == "q8_0"        # the head stays 8-bit under q4_0
    got = _logits(llm)
    assert ((got - ref).norm() / ref.norm()).item() < tol
    assert llm.generate("The history of the city", max_new_tokens=4).token_ids


def test_artifacts_record_and_check_the_weight_format(tmp_path, llama_relu):
    data = tmp_path / "calib.txt"
    data.write_text(TEXT * 20)
    rep = edgesparse.calibrate(llama_relu, tmp_path / "a", data=[data], backend="cpu", tokens=512, window=64,
                               weights="q8_0")
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["weights"] == "q8_0"
    llm = edgesparse.load(llama_relu, backend="cpu", weights="q8_0", artifacts=rep["artifacts"])
    assert llm.model.ffn_mode == "predictor" and llm.generate("The quick", max_new_tokens=3).token_ids
    with pytest.raises(FingerprintMismatchError, match="calibrated with q8_0 weights.*--weights q8_0"):
        edgesparse.load(llama_relu, backend="cpu", artifacts=rep["artifacts"])
    with pytest.raises(FingerprintMismatchError, match="q4_0"):
        edgesparse.load(llama_relu, backend="cpu", weights="q4_0", artifacts=rep["artifacts"])


def test_unknown_weight_format_is_an_option_error():
    with pytest.raises(InvalidOptionError, match="q8_0, q4_0"):
        edgesparse.load("tiny", backend="cpu", weights="q5_k")


def test_cli_weights_flag():
    run = lambda *a: subprocess.run([sys.executable, "-m", "edgesparse", *a], capture_output=True, text=True)  # noqa: E731
    r = run("generate", "tiny", "--prompt", "The city", "--max-new-tokens", "3", "--weights", "q4_0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] >= 1
    r = run("generate", "tiny", "--prompt", "x", "--weights", "q5_k")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    from edgesparse.errors import ModelFilesError
    from edgesparse.gguf_file import open_gguf
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(ModelFilesError, match="bad magic"):
        open_gguf(bad)


@pytest.mark.parametrize("saved, want", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                         (torch.float16, torch.bfloat16)])
def test_default_precision_is_the_checkpoints_own(tmp_path, saved, want):
    """No dtype asked: the checkpoint's ``dtype`` (an fp16 one runs bf16 on the cpu backend, as
    vLLM's cpu backend does); asked: what was asked."""
    from conftest import make_checkpoint
    path = make_checkpoint(tmp_path / "m", dtype=saved)
    llm = edgesparse.load(path, backend="cpu")
    assert llm.model.dtype == want and llm.model.layers[0].attn.norm.dtype == want
    assert llm.generate("The quick", max_new_tokens=2).token_ids
    assert edgesparse.load(path, backend="cpu", dtype="fp32").model.dtype == torch.float32
    assert edgesparse.load("tiny", backend="cpu").model.dtype == torch.bfloat16   # tiny is stored in bf16
    r = subprocess.run([sys.executable, "-m", "edgesparse", "generate", str(path), "--prompt", "The quick",
                        "--max-new-tokens", "2", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
