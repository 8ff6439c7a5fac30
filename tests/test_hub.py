"""Hugging Face hub ids as model paths, against a hub cache this test lays out in the standard
format (models--org--name/refs + snapshots), offline: the hub itself is never reached."""
import os
import shutil
import subprocess
import sys

import pytest

from edgesparse.embedded import TINY
from edgesparse.errors import ModelFilesError
from edgesparse.hub import parse_hub_id
from edgesparse.loader import resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path):
    snap = tmp_path / "hub" / "models--acme--tiny-llm" / "snapshots" / COMMIT
    shutil.copytree(TINY, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hub"


def _run(cache, *args):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "edgesparse", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_parse_hub_ids():
    assert parse_hub_id("acme/tiny-llm") == ("acme/tiny-llm", None, None)
    assert parse_hub_id("acme/tiny-llm@v1.0") == ("acme/tiny-llm", "v1.0", None)
    assert parse_hub_id("acme/m-GGUF:m.Q4_0.gguf") == ("acme/m-GGUF", None, "m.Q4_0.gguf")
    assert parse_hub_id("/abs/path") is None and parse_hub_id("a/b/c") is None


def test_a_cached_hub_id_loads_and_generates_offline(hub_cache):
    r = _run(hub_cache, "generate", "acme/tiny-llm", "--prompt", "The history of the city", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_an_uncached_hub_id_offline_is_a_clear_error(hub_cache):
    r = _run(hub_cache, "generate", "acme/not-cached", "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not in the Hugging Face cache" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelFilesError, match="model not found"):
        resolve_model_path("models/missing-model")
    with pytest.raises(ModelFilesError, match="model not found"):
        resolve_model_path("x/model.gguf")


GGUF = TINY.parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not GGUF.exists(), reason="run bench/get_smollm2.py first")
def test_a_gguf_file_of_a_repo(tmp_path):
    snap = tmp_path / "hub" / "models--acme--smol-GGUF" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / GGUF.name).symlink_to(GGUF)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)
    code = ("from edgesparse.loader import resolve_model_path as r\n"
            f"print(r('acme/smol-GGUF:{GGUF.name}'))\n"
            "try:\n    r('acme/smol-GGUF')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0] == str(snap / GGUF.name)
    assert lines[1].startswith("ModelFilesError") and f"acme/smol-GGUF:FILE.gguf ({GGUF.name})" in lines[1]
