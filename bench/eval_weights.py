"""Perplexity by weight format, in one run (issue "Quantized sparse weights", accuracy table).

    python bench/eval_weights.py [--tokens 65536] [--out bench/results/weights_ppl.json]

WikiText-2 test (raw), 512-token windows, the same windows for every row:
* SmolLM2-135M-Instruct from its Q4_1 GGUF: read natively in fp32 (= transformers'
  de-quantisation), its own q4_1 blocks (the default), and re-quantised to q8_0 / q4_0; each
  dense (``--tokens``) and with 25% / 40% rotated Top-K (``--topk-tokens``, with the dense
  figure on those same windows; calibrated with the same weights on WikiText-2 valid);
* tiny (the embedded ReGLU model): bf16 / q8_0 / q4_0, dense and with SVD predictors
  calibrated for that format.
Prints JSON and writes it to --out."""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import edgesparse
from edgesparse.eval.data import find_data_dir, read_texts, token_windows
from edgesparse.eval.perplexity import window_nll

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def ppl(llm, windows, sparse):
    nll, n = window_nll(llm.model, windows, sparse, "ppl")
    return round(math.exp(nll / n), 4)


def calib_file(tmp: Path) -> Path:
    text, _ = read_texts([find_data_dir() / "wikitext-2-tok-valid.txt"])
    f = tmp / "calib.txt"
    f.write_text(text[:400_000])
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.4])
    ap.add_argument("--topk-tokens", type=int, default=16384,
                    help="tokens for the Top-K rows (their masked evaluation is ~4x slower than dense)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/weights_ppl.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    test, _ = read_texts([find_data_dir() / "wikitext-2-raw-test.txt"])
    res = {"data": "wikitext-2-raw-test", "window": 512, "smollm2": {}, "tiny": {}}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        tmp = Path(tmp)
        cal = calib_file(tmp)
        for fmt in ("fp32", None, "q8_0", "q4_0"):
            name = fmt or "q4_1 (file's own blocks)"
            llm = edgesparse.load(GGUF, backend="cpu", weights=fmt)
            windows = token_windows(llm.tokenizer, test, 512, a.tokens)
            row = {"tokens": int(windows.numel()), "dense": ppl(llm, windows, False)}
            few = windows[:max(1, a.topk_tokens // 512)]
            row["topk_tokens"] = int(few.numel())
            row["dense_on_topk_tokens"] = ppl(llm, few, False)
            for level in a.levels:
                arts = tmp / f"smol-{fmt}-{level}"
                edgesparse.calibrate(GGUF, arts, data=[cal], backend="cpu", weights=fmt, tokens=8192,
                                     attn_sparsity=level, mlp_sparsity=level)
                sparse = edgesparse.load(GGUF, backend="cpu", weights=fmt, artifacts=arts)
                row[f"topk_{level}"] = ppl(sparse, few, True)
            res["smollm2"][name] = row
            print(name, row, flush=True)
        for fmt in ("bf16", "q8_0", "q4_0"):
            llm = edgesparse.load("tiny", backend="cpu", weights=fmt)
            windows = token_windows(llm.tokenizer, test, 512, a.tokens)
            arts = tmp / f"tiny-{fmt}"
            edgesparse.calibrate("tiny", arts, backend="cpu", weights=fmt)
            sparse = edgesparse.load("tiny", backend="cpu", weights=fmt, artifacts=arts)
            row = {"tokens": int(windows.numel()), "dense": ppl(llm, windows, False),
                   "predictor": ppl(sparse, windows, True)}
            res["tiny"][fmt] = row
            print("tiny", fmt, row, flush=True)
    res["seconds"] = round(time.time() - t0)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
