"""`edgesparse calibrate MODEL -o DIR` with no flags, timed, on every supported kind of model:
the embedded ReGLU model, SmolLM2-135M-Instruct (its Q4_1 GGUF: SwiGLU, Llama family) and a
Qwen2-family checkpoint (random weights, Qwen2.5-0.5B's width, 4 layers).  Prints JSON: each
run's wall time, what calibrate chose, and the CPU it ran on.

    python bench/calibrate_defaults.py [--smollm2 models/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def qwen2_checkpoint(out: Path) -> Path:
    import torch
    from conftest import make_checkpoint
    return make_checkpoint(out, "qwen2", "silu", dtype=torch.bfloat16, hidden_size=896, intermediate_size=4864,
                           num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                           max_position_embeddings=4096, tie_word_embeddings=True)


def timed_calibrate(model: str, out: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edgesparse", "--quiet", "calibrate", model, "-o", str(out), "--json"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return dict(model=model, error=r.stderr.strip().splitlines()[-1:])
    rep = json.loads(r.stdout)
    return dict(model=Path(model).name, wall_s=round(wall, 1), calibrate_s=rep["seconds"],
                chose=rep.get("defaults") or {"ffn": "predictor", "gate_sparsity": rep.get("gate_sparsity")},
                said=r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else [])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    a = ap.parse_args()
    from edgesparse.backends.cpu.native import variant
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in ("tiny", a.smollm2, str(qwen2_checkpoint(tmp / "qwen2-0.5b-width"))):
            runs.append(timed_calibrate(model, tmp / f"arts-{len(runs)}"))
    print(json.dumps(dict(cpu_count=os.cpu_count(), native=variant()["isa"], runs=runs), indent=1))


if __name__ == "__main__":
    main()
