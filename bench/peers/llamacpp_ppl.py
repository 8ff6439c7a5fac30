"""llama.cpp's own loss from re-quantising SmolLM2-135M-Instruct's Q4_1 file to Q4_0, beside
edgesparse's loss from the same re-quantisation (issue "Quantized sparse weights": "q4_0 no worse
than llama.cpp's Q4_0 loses on the same model").  Not part of CI.

    python bench/peers/llamacpp_ppl.py --work /tmp/peer [--ours bench/results/weights_ppl.json]
        [--out bench/results/llamacpp_ppl_smollm2.json]

llama.cpp is built as in ``llamacpp.py`` plus the ``llama-perplexity`` target; the Q4_0 file is
``llama-quantize --allow-requantize`` of the Q4_1 file (its recipe: 4-bit blocks, token_embd kept
at q8_0).  ``llama-perplexity -c 512 --chunks 128`` reads the first 65,536 tokens of WikiText-2
test and scores the second half of each 512-token window, while ``bench/eval_weights.py`` scores
every token of its windows, so the absolute perplexities differ; the comparison is each tool's
ratio q4_0 / q4_1 on its own windows.  edgesparse's figures come from ``--ours`` (the output of
``bench/eval_weights.py``)."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402

ROOT = llamacpp.ROOT
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def perplexity(src: Path, gguf: Path, text: Path, threads: int, chunks: int) -> float:
    r = llamacpp.run([src / "build" / "bin" / "llama-perplexity", "-m", gguf, "-f", text, "-c", 512,
                      "--chunks", chunks, "-t", threads, "-b", 512], capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if m is None:
        raise RuntimeError(f"no perplexity in llama-perplexity's output for {gguf}")
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=128)
    ap.add_argument("--ours", type=Path, default=ROOT / "bench/results/weights_ppl.json")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/llamacpp_ppl_smollm2.json")
    a = ap.parse_args()
    src = llamacpp.build_llama_cpp(a.work)
    if not (src / "build" / "bin" / "llama-perplexity").exists():
        llamacpp.run(["cmake", "--build", "build", "-j2", "--target", "llama-perplexity"], cwd=src)
    q40 = a.work / "smollm2-q4_0.gguf"
    if not q40.exists():
        llamacpp.run([src / "build" / "bin" / "llama-quantize", "--allow-requantize", GGUF, q40, "Q4_0"])
    from edgesparse.eval.data import find_data_dir
    text = find_data_dir() / "wikitext-2-raw-test.txt"
    peer = {name: perplexity(src, f, text, a.threads, a.chunks) for name, f in (("q4_1", GGUF), ("q4_0", q40))}
    ours = json.loads(a.ours.read_text())["smollm2"]
    mine = {"q4_1": ours["q4_1 (file's own blocks)"]["dense"], "q4_0": ours["q4_0"]["dense"]}
    res = {"model": "SmolLM2-135M-Instruct, from its Q4_1 GGUF", "data": "wikitext-2-raw-test",
           "llama_cpp": {"ppl": peer, "q4_0_over_q4_1": round(peer["q4_0"] / peer["q4_1"], 4),
                         "windows": f"{a.chunks} x 512 tokens, second half of each scored"},
           "edgesparse": {"ppl": mine, "q4_0_over_q4_1": round(mine["q4_0"] / mine["q4_1"], 4),
                          "windows": "512-token windows, every token scored (bench/eval_weights.py)",
                          "source": str(a.ours.relative_to(ROOT)) if a.ours.is_relative_to(ROOT) else str(a.ours)}}
    res["edgesparse_loss_vs_llama_cpp_loss"] = round((res["edgesparse"]["q4_0_over_q4_1"] - 1)
                                                     / (res["llama_cpp"]["q4_0_over_q4_1"] - 1), 3)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
