"""Bad input: one exception family, one-line messages, exit code 2 and no traceback in the CLI."""
import json
import subprocess
import sys

import pytest
import torch

import edgesparse
from edgesparse.apps.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgesparse", *args], capture_output=True, text=True,
                          timeout=300)


def test_missing_model_path(tmp_path):
    with pytest.raises(edgesparse.ModelFilesError, match="not found"):
        edgesparse.load(tmp_path / "nope")


def test_dir_without_config(tmp_path):
    with pytest.raises(edgesparse.ModelFilesError, match="config.json"):
        edgesparse.load(tmp_path)


def test_unknown_architecture(tmp_path, llama_relu):
    import shutil
    d = tmp_path / "gpt2ish"
    shutil.copytree(llama_relu, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(edgesparse.UnsupportedModelError, match="unsupported architecture"):
        edgesparse.load(d)


def test_corrupted_weights(tmp_path, llama_relu):
    import shutil
    d = tmp_path / "broken"
    shutil.copytree(llama_relu, d)
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(edgesparse.ModelFilesError, match="corrupted"):
        edgesparse.load(d)


def test_bad_options(llama_relu):
    llm = edgesparse.load(llama_relu, backend="cpu")
    for kw, msg in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                    (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
                    (dict(max_new_tokens=10_000), "context")]:
        with pytest.raises(edgesparse.InvalidOptionError, match=msg):
            llm.generate("hello", **kw)
    with pytest.raises(edgesparse.EmptyDataError):
        llm.generate("")
    with pytest.raises(edgesparse.EmptyDataError):
        llm.generate([])
    with pytest.raises(edgesparse.InvalidOptionError, match="dtype"):
        edgesparse.load(llama_relu, dtype="int3")
    with pytest.raises(edgesparse.InvalidOptionError, match="artifacts"):
        llm.set_ffn_mode("predictor")


@pytest.mark.parametrize("args,needle", [
    (["generate", "/no/such/model", "--prompt", "x"], "model not found"),
    (["generate", "tiny", "--prompt", "x", "--backend", "cann"], "available: cpu"),
    (["generate", "tiny", "--prompt", "x", "--temperature", "-3"], "temperature"),
])
def test_cli_user_errors_exit_2_with_one_line(args, needle):
    if "cann" in args and edgesparse.backends.backend_status()["cann"][0]:
        pytest.skip("an NPU is present")
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_cli_bad_option_value_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "tiny", "--prompt", "x", "--max-new-tokens", "-1"])
    assert e.value.code == 2
