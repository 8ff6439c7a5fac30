"""The fuzz suite's runner: builds the seeds, generates every case (``cases.py``) and loads
each through the Python API in this one process, writing one JSON line per case to ``--out``.

A case passes when it is refused with an ``EdgeSparseError`` whose message is one line, or
when it loads and a model whose every shape agrees with its config decodes a few tokens.
Anything else (another exception, a non-finite shape check) is recorded as a failure; a
crash or a hang ends the process, and ``test_fuzz.py`` names the case printed last.  Run it
with the native kernels built under AddressSanitizer and UBSan (``EDGESPARSE_NATIVE_SANITIZE=1``
and libasan preloaded; ``test_fuzz.py`` does both)."""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

import cases  # noqa: E402
from conftest import TEXT, make_checkpoint  # noqa: E402
from gguf_writer import write_gguf  # noqa: E402


class Hang(Exception):
    pass


def _alarm(*_):
    raise Hang()


def check_loaded(llm) -> str | None:
    """None if every shape of the loaded model agrees with its spec and a decode runs."""
    m, s = llm.model, llm.model.spec
    if len(m.layers) != s.n_layers or m.embed.shape != (s.vocab_size, s.hidden):
        return f"loaded with {len(m.layers)} layers, embedding {tuple(m.embed.shape)} against spec {s}"
    n = min(3, s.max_positions - 1)   # a prompt, then one decode step (the native kernels)
    ids = torch.tensor([[1, 2, 3]])[:, :max(n, 1)] % s.vocab_size
    cache = m.new_cache(1, 8)
    with torch.no_grad():
        logits = m.forward(ids, cache, torch.arange(ids.shape[1])[None])
        if n >= 1:
            logits = m.forward(ids[:, :1], cache, torch.tensor([[ids.shape[1]]]))
    if logits.shape[-1] != s.vocab_size:
        return f"logits of width {logits.shape[-1]} for a vocabulary of {s.vocab_size}"
    return None


def run_case(kind: str, path: Path, base=None) -> dict:
    import edgesparse
    from edgesparse.errors import EdgeSparseError
    signal.alarm(120)
    try:
        llm = (edgesparse.load(path, backend="cpu") if kind == "gguf"
               else edgesparse.load(base, backend="cpu", artifacts=path))
        problem = check_loaded(llm)
        return dict(outcome="failure", why=problem) if problem else dict(outcome="loaded")
    except EdgeSparseError as e:
        msg = str(e)
        one_line = msg and "\n" not in msg and len(msg) <= 600
        return dict(outcome="refused" if one_line else "failure", message=msg[:600],
                    why=None if one_line else "not a one-line message")
    except Hang:
        return dict(outcome="failure", why="took over 120 s")
    except Exception as e:   # noqa: BLE001  the point: anything but the project's error is a failure
        return dict(outcome="failure", why=f"traceback: {type(e).__name__}: {str(e)[:300]}")
    finally:
        signal.alarm(0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smollm2", type=Path, default=None)
    a = ap.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    work = a.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "cases").mkdir(parents=True)
    from edgesparse.sparsity.calibrate import calibrate
    # -- seeds: the project's own small models, then SmolLM2 ---------------------------------------
    ck = make_checkpoint(work / "ckpt-silu", "llama", "silu", tie_word_embeddings=True)
    seeds = {"q8": write_gguf(ck, work / "seed-q8.gguf", "Q8_0"),
             "q41": write_gguf(ck, work / "seed-q41.gguf", "Q4_1", head_qtype="Q8_0"),
             "f32": write_gguf(ck, work / "seed-f32.gguf", "F32")}
    text = work / "text.txt"
    text.write_text(TEXT * 4)
    topk_arts = work / "arts-topk"
    calibrate(ck, topk_arts, data=[text], backend="cpu", tokens=1024, window=128,
              attn_sparsity=0.4, mlp_sparsity=0.4)
    all_cases = []
    all_cases += [("gguf", *c) for c in cases.gguf_cases(seeds["q8"], "q8", n_flips=80)]
    all_cases += [("gguf", *c) for c in cases.gguf_cases(seeds["q41"], "q41", n_flips=20, metadata=False)]
    all_cases += [("gguf", *c) for c in cases.gguf_cases(seeds["f32"], "f32", metadata=False)]
    if a.smollm2 is not None and a.smollm2.exists():
        all_cases += [("gguf", *c) for c in cases.gguf_cases(a.smollm2, "smollm2", n_flips=8, metadata=False,
                                                           every_tensor=False)]
    from edgesparse.embedded import TINY_ARTIFACTS
    all_cases += [("arts-tiny", *c) for c in cases.predictor_artifact_cases(TINY_ARTIFACTS, work / "arts", "tiny")]
    all_cases += [("arts-topk", *c) for c in cases.topk_artifact_cases(topk_arts, work / "arts", "topk")]
    print(f"fuzz: {len(all_cases)} cases", flush=True)
    with open(a.out, "w") as out:
        for kind, case_id, payload in all_cases:
            print(f"case {case_id}", flush=True)   # the last line printed names a case that crashed
            t0 = time.perf_counter()
            if kind == "gguf":
                path = work / "cases" / f"{case_id}.gguf"
                path.write_bytes(payload)
                res = run_case("gguf", path)
                path.unlink()
            else:
                res = run_case("arts", payload, "tiny" if kind == "arts-tiny" else ck)
            res.update(case=case_id, kind=kind, seconds=round(time.perf_counter() - t0, 3))
            out.write(json.dumps(res) + "\n")
            out.flush()
    print("fuzz: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
