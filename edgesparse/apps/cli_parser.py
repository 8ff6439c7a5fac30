"""The ``edgesparse`` command line's options: every subcommand, every option with its help and
its choices (``cli.py`` holds what each command does)."""
from __future__ import annotations

import argparse

DEMO_PROMPT = "The history of the city"
DESCRIPTION = ("Training-free activation sparsity for LLM decoding: load a Hugging Face checkpoint or a GGUF "
               "file, calibrate it once, and generate, chat or serve with the sparse layers.")
JSON_HELP = "print one JSON object instead of text"
FFN_MODE_HELP = "FFN mode: dense, exact (rows where ReLU(gate) > 0) or predictor (default: the artifacts' mode)"
SAMPLING_HELP = {"temperature": "sampling temperature (0: greedy)", "top-p": "nucleus sampling: keep this much mass",
                 "top-k": "sample among the k most likely tokens", "min-p": "drop tokens below this share of the top one",
                 "repetition-penalty": "divide repeated tokens' logits by this (1: off)"}


def _add_model_opts(p, artifacts=True):
    from edgesparse.backends import choices
    from edgesparse.backends.formats import WEIGHT_FORMATS
    p.add_argument("model", help="HF checkpoint dir, .gguf file, hub id org/name[@revision][:FILE.gguf], "
                   "or 'tiny' (the embedded model)")
    p.add_argument("--backend", default="auto", choices=choices(),
                   help="where the sparse layers run (default auto: the first available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="activations and KV cache (default: the checkpoint's own; fp16 runs bf16 on cpu; GGUF: fp32)")
    p.add_argument("--weights", default=None, choices=WEIGHT_FORMATS,
                   help="weight matrices' format (default: the checkpoint's own precision; "
                        "a GGUF file keeps its 8- or 4-bit blocks)")
    if artifacts:
        p.add_argument("--artifacts", default=None, help="calibration artifact dir (from `calibrate`)")

def _add_graph_opt(p):
    p.add_argument("--graph", action="store_true",
                   help="decode by replaying a captured CUDA graph of the whole step (cuda backend)")


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _fraction(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgesparse", description=DESCRIPTION)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="decode a prompt on the embedded model, dense vs sparse")
    from edgesparse.backends import choices
    p.add_argument("--backend", default="auto", choices=choices(),
                   help="where the sparse layers run (default auto: the first available)")
    p.add_argument("--prompt", default=DEMO_PROMPT, help=f"text to continue (default {DEMO_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=_positive_int, default=48, help="tokens per mode (default 48)")

    p = sub.add_parser("generate", help="complete a prompt")
    _add_model_opts(p)
    p.add_argument("--prompt", required=True, help="the text to complete, or the question to a chat model")
    p.add_argument("--raw", action="store_true",
                   help="complete the prompt as it is, without the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="most tokens to generate (default 64)")
    _add_sampling_opts(p, "greedy")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible text)")
    p.add_argument("--ffn-mode", choices=["dense", "exact", "predictor"], default=None, help=FFN_MODE_HELP)
    p.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    _add_graph_opt(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    for name in ("info", "env"):   # env: the name llama.cpp and vLLM users look for
        sub.add_parser(name, help="versions, backends (and why one is unavailable), the native kernels, "
                       "threads").add_argument("--json", action="store_true", help=JSON_HELP)

    _add_more_commands(sub)
    return ap

SAMPLING_OPTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _add_sampling_opts(p, fallback: str):
    for name, kind in (("temperature", float), ("top-p", float), ("top-k", int), ("min-p", float),
                       ("repetition-penalty", float)):
        p.add_argument(f"--{name}", type=kind, default=None, help=SAMPLING_HELP[name])
    p.epilog = ("Sampling options left out come from the checkpoint's generation_config.json, "
                f"else: {fallback}.")

def _add_more_commands(sub):
    from edgesparse.backends import choices
    from edgesparse.backends.formats import BLOCK_FORMATS
    p = sub.add_parser("calibrate", help="build FFN predictors (and rotations) from calibration text")
    _add_model_opts(p, artifacts=False)
    p.add_argument("-o", "--output", required=True, help="artifact dir to write")
    p.add_argument("--data", nargs="+", default=None, help="text files (default: the embedded corpus)")
    p.add_argument("--tokens", type=_positive_int, default=None,
                   help="calibration tokens read from --data (default 16384)")
    p.add_argument("--rank", type=_positive_int, default=None,
                   help="one predictor rank for every layer (default: each layer's rank by the cost model)")
    p.add_argument("--float-predictor", action="store_true",
                   help="keep predictor factors in float (default: per-row int8 grid, half the bytes)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-recall", type=_fraction, default=None,
                   help="ReGLU: share of the truly active neurons the predictor must keep (default 0.99)")
    g.add_argument("--target-sparsity", type=_fraction, default=None,
                   help="ReGLU: share of gate rows the predictor skips, in every layer (instead of a recall)")
    p.add_argument("--attn-sparsity", type=_fraction, default=None, help="Top-K sparsity of attention projections")
    p.add_argument("--mlp-sparsity", type=_fraction, default=None, help="Top-K sparsity of SwiGLU MLPs")
    p.add_argument("--topk-method", choices=["rotated", "magnitude"], default="rotated",
                   help="Top-K of the LaRoSA-rotated input (default) or of the plain input (TEAL-style)")
    p.add_argument("--rotation", choices=["shared", "per-site", "global"], default="shared",
                   help="LaRoSA basis: one per layer, one per attention/MLP input, or one for the model")
    p.add_argument("--topk-scaled", action="store_true",
                   help="rank Top-K entries by |x|·||W[:, j]|| instead of |x| (see docs/accuracy.md)")
    p.add_argument("--topk-allocation", default="uniform", metavar="{uniform,measured,greedy}",
                   help="uniform (the same K in every layer), measured (per-layer K by block errors "
                        "measured on Top-K outputs) or greedy (per-layer K by an estimate)")
    p.add_argument("--topk-spread", type=float, default=None,
                   help="measured allocation: each block's sparsity stays within the asked one ± this")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    ev = sub.add_parser("eval", help="evaluate quality dense vs sparse").add_subparsers(dest="what", required=True)
    p = ev.add_parser("ppl", help="perplexity dense vs sparse")
    _add_model_opts(p)
    p.add_argument("--data", nargs="+", required=True, help="text files to score")
    p.add_argument("--window", type=_positive_int, default=512, help="tokens per scored window (default 512)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="score at most this many tokens")
    p.add_argument("--ffn-mode", choices=["dense", "exact", "predictor"], default=None, help=FFN_MODE_HELP)
    p.add_argument("--plot", default=None, help="PNG of per-layer sparsity and recall")
    p.add_argument("--compare", default=None, metavar="ARTIFACTS",
                   help="other artifacts of the same model: their perplexity on the same windows, paired")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = ev.add_parser("zeroshot", help="LAMBADA / PIQA / ARC-Easy / HellaSwag accuracy, dense vs sparse")
    _add_model_opts(p)
    p.add_argument("--tasks", nargs="+", default=None,
                   help="tasks to run, of lambada, piqa, arc_easy, hellaswag (default: all four)")
    p.add_argument("--limit", type=_positive_int, default=200, help="items per task (first N)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    bs = sub.add_parser("bench", help="speed benchmarks (JSON)").add_subparsers(dest="what", required=True)
    p = bs.add_parser("ffn", help="one FFN layer: dense vs predictor-sparse vs exact-sparse")
    p.add_argument("--shape", default="4096x11008", help="HIDDENxINTERMEDIATE of the layer (default 4096x11008)")
    p.add_argument("--sparsity", type=_fraction, default=0.9, help="share of neurons inactive (default 0.9)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="float weights' precision")
    p.add_argument("--weights", choices=BLOCK_FORMATS, default=None, help="block-quantised weights")
    p.add_argument("--backend", default="cpu", choices=choices(), help="backend to time (default cpu)")
    p.add_argument("--rank", type=_positive_int, default=None, help="predictor rank (default: by the hidden size)")
    p.add_argument("--repeats", type=_positive_int, default=15, help="timed repeats; the median is reported")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p = bs.add_parser("decode", help="decode tokens/s: transformers vs dense vs sparse")
    p.add_argument("model", nargs="?", default=None, help="checkpoint to time (or --synthetic)")
    p.add_argument("--synthetic", default=None,
                   help="a random-weight ReGLU model of a named shape: tinyllama-1.1b or minicpm-s-1b")
    p.add_argument("--gate-sparsity", type=_fraction, default=0.86,
                   help="synthetic: share of gate rows the predictor skips (default 0.86: ~90%% of FFN rows)")
    p.add_argument("--attn-sparsity", type=_fraction, default=0.4, help="Top-K sparsity of attention (default 0.4)")
    p.add_argument("--backend", default="cpu", choices=choices(), help="backend to time (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="float weights' precision")
    p.add_argument("--weights", choices=BLOCK_FORMATS, default=None, help="block-quantised weights")
    p.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens decoded per timed run")
    p.add_argument("--rounds", type=_positive_int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--rotation", choices=["shared", "per-site", "global"], default="global",
                   help="LaRoSA basis of the synthetic Top-K model")
    _add_graph_opt(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal, streamed")
    _add_model_opts(p)
    _add_graph_opt(p)
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="most tokens per answer (default 256)")
    _add_sampling_opts(p, "temperature 0.7, top-p 0.9, min-p 0.05, repetition penalty 1.1")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible text)")
    p.add_argument("--system", default=None, help="system prompt")

    p = sub.add_parser("serve", help="local OpenAI-compatible server")
    _add_model_opts(p)
    _add_graph_opt(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $EDGESPARSE_API_KEY, else none)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="accept this Host header too (loopback servers accept only localhost names)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API; '*' for any")
    p.add_argument("--max-body-mb", type=float, default=2.0, help="largest request body (413 above)")
    p.add_argument("--max-queue", type=_positive_int, default=128, help="requests waiting or running (503 above)")
    p.add_argument("-np", "--parallel", type=_positive_int, default=1,
                   help="requests decoded at once, continuously batched (default 1: one at a time)")
    p.add_argument("--stall-timeout", type=float, default=60.0,
                   help="seconds without decode progress, with work queued, before /health says degraded")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed")

