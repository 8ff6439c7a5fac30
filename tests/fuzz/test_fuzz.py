"""Untrusted model and artifact files (docs/architecture.md, "What is validated"): every crafted
case is refused with one line or loads correctly, with the native kernels built under
AddressSanitizer and UBSan so that a read past a buffer fails even where it would not crash.
The cases come from ``cases.py``; ``run.py`` loads them all in one sanitised process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
sys.path[:0] = [str(HERE), str(HERE.parent)]


def _sanitizer_preload() -> str | None:
    """libasan (and libstdc++, so that torch's C++ exceptions pass ASan's interceptor) for
    LD_PRELOAD: an ASan-built library needs the runtime loaded first."""
    cc = os.environ.get("CC") or "gcc"
    try:
        libs = [subprocess.run([cc, f"-print-file-name={n}"], capture_output=True, text=True).stdout.strip()
                for n in ("libasan.so", "libstdc++.so.6")]
    except OSError:
        return None
    return " ".join(libs) if all(os.path.isabs(p) for p in libs) else None


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    env = dict(os.environ, EDGESPARSE_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1")
    preload = _sanitizer_preload()
    if preload:
        env.update(LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", EDGESPARSE_NATIVE_SANITIZE="1")
    out = work / "results.jsonl"
    cmd = [sys.executable, str(HERE / "run.py"), "--work", str(work / "w"), "--out", str(out)]
    if SMOLLM2.exists():
        cmd += ["--smollm2", str(SMOLLM2)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    except subprocess.TimeoutExpired as e:
        last = [l for l in (e.stdout or b"").decode(errors="replace").splitlines() if l.startswith("case ")]
        pytest.fail(f"the fuzz run hung; last case: {last[-1] if last else '?'}")
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or "fuzz: done" not in lines:
        last = [l for l in lines if l.startswith("case ")]
        pytest.fail(f"the fuzz run died (exit {proc.returncode}) at {last[-1] if last else 'setup'}:\n"
                    + "\n".join(proc.stderr.splitlines()[-40:]))
    return [json.loads(l) for l in out.read_text().splitlines()], bool(preload)


def test_every_crafted_file_is_refused_cleanly_or_loads_correctly(fuzz_results):
    results, sanitized = fuzz_results
    assert sanitized, "no AddressSanitizer runtime found: the fuzz suite needs gcc's libasan"
    assert len(results) >= 200
    failures = [f"{r['case']}: {r['why']}" for r in results if r["outcome"] == "failure"]
    assert not failures, "\n".join(failures[:30])
    counts = Counter((r["kind"], r["outcome"]) for r in results)
    # both outcomes occur for GGUF files (flips in the data and same-size edits still load), and
    # every crafted artifact is refused
    assert counts[("gguf", "refused")] > 100 and counts[("gguf", "loaded")] > 0
    assert counts[("arts-tiny", "refused")] >= 15 and counts[("arts-topk", "refused")] >= 10
    assert not counts[("arts-tiny", "loaded")] and not counts[("arts-topk", "loaded")]


def test_the_issue_reproductions_are_refused_with_one_line(fuzz_results):
    results, _ = fuzz_results
    by_case = {r["case"]: r for r in results}
    for case, words in {
        "q8-blk.0.ffn_up.weight-rows-1": "ffn_up",           # the SIGFPE of issue 34
        "q8-blk.0.ffn_down.weight-rows-half": "ffn_down",
        "q41-blk.0.ffn_down.weight-type-8": "offset",        # Q4_1 relabelled Q8_0
        "q8-blk.0.attn_q.weight-offset+1": "alignment",
        "q8-embd-at-blk.0.ffn_up.weight": "token_embd",
        "q8-version-99": "version 99",
        "q8-string-length-9223372036854775808": "past the end",
        "q8-tensor-count-4611686018427387904": "tensor count",
        "tiny-a-half-rows": "predictor.a", "tiny-rank-mismatch": "predictor.b", "tiny-bias-10": "bias",
        "tiny-layers-5": "layers", "tiny-topk-int": "topk.k", "tiny-rank-0": "rank", "tiny-a-3d": "predictor.a",
    }.items():
        r = by_case[case]
        assert r["outcome"] == "refused" and words in r["message"], (case, r)


CLI_CASES = ("q8-blk.0.ffn_up.weight-rows-1", "q8-cut-1000", "q8-version-99")


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_a_crafted_gguf_with_exit_2_and_one_line(case, tmp_path):
    import cases
    from conftest import make_checkpoint
    from gguf_writer import write_gguf
    seed = write_gguf(make_checkpoint(tmp_path / "ck", "llama", "silu", tie_word_embeddings=True),
                      tmp_path / "seed.gguf", "Q8_0")
    if case == "q8-cut-1000":
        payload = seed.read_bytes()[:1000]
    else:
        payload = dict(cases.gguf_cases(seed, "q8", metadata=False))[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(payload)
    env = dict(os.environ, EDGESPARSE_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "edgesparse", "generate", str(bad), "--prompt", "hi",
                        "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_cli_refuses_a_crafted_artifact_with_exit_2_and_one_line(tmp_path):
    import cases
    from edgesparse.embedded import TINY_ARTIFACTS
    bad = dict(cases.predictor_artifact_cases(TINY_ARTIFACTS, tmp_path, "tiny"))["tiny-rank-mismatch"]
    r = subprocess.run([sys.executable, "-m", "edgesparse", "generate", "tiny", "--artifacts", str(bad),
                        "--prompt", "hi", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "predictor" in r.stderr, r.stderr
