"""The ``edgesparse`` command line.  User errors print one line and exit 2 (no traceback)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import EdgeSparseError, InvalidOptionError

DEMO_PROMPT = "The history of the city"


def _add_model_opts(p, artifacts=True):
    from edgesparse.backends import choices
    p.add_argument("model", help="HF checkpoint dir, .gguf file, or 'tiny' (the embedded model)")
    p.add_argument("--backend", default="auto", choices=choices())
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    if artifacts:
        p.add_argument("--artifacts", default=None, help="calibration artifact dir (from `calibrate`)")


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
    ap = argparse.ArgumentParser(prog="edgesparse", description=__doc__)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="decode a prompt on the embedded model, dense vs sparse")
    p.add_argument("--backend", default="auto")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=_positive_int, default=48)

    p = sub.add_parser("generate", help="complete a prompt")
    _add_model_opts(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ffn-mode", choices=["dense", "exact", "predictor"], default=None)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--json", action="store_true")

    sub.add_parser("info", help="backends, devices, versions").add_argument("--json", action="store_true")

    from . import cli_more
    cli_more.add_commands(sub, _add_model_opts, _positive_int, _fraction)
    return ap


def cmd_demo(args):
    from .api import load
    from .embedded import TINY_ARTIFACTS
    llm = load("tiny", backend=args.backend, artifacts=TINY_ARTIFACTS if TINY_ARTIFACTS.exists() else None)
    sparse_mode = llm.model.ffn_mode
    print(f"edgesparse demo: embedded 'tiny' ReGLU model on backend {llm.backend}")
    print(f"prompt: {args.prompt!r}\n")
    speed = {}
    modes = ("dense", "exact", "predictor") if sparse_mode == "predictor" else ("dense", sparse_mode)
    for mode in modes:
        llm.set_ffn_mode(mode)
        llm.generate(args.prompt, max_new_tokens=4)  # warm-up
        llm.model.stats.reset()
        out = llm.generate(args.prompt, max_new_tokens=args.max_new_tokens, stop_token_ids=[])
        s = llm.model.stats.summary()
        speed[mode] = out.tokens_per_s
        print(f"[{mode}] {out.tokens_per_s:.1f} tok/s, FFN sparsity {s['ffn_sparsity']:.1%}"
              + (f", gate rows skipped {s['gate_sparsity']:.1%}" if mode == "predictor" else ""))
        print(args.prompt + out.text + "\n")
    if max(speed[m] for m in modes[1:]) < speed["dense"]:
        print("note: 'tiny' (d=256, d_ff=1024) is too small for the skipped FFN rows to outweigh the\n"
              "per-op overhead of the sparse path; see `edgesparse bench decode --synthetic tinyllama-1.1b`\n"
              "and docs/performance.md for a model where they do.")


def cmd_generate(args):
    from .api import load
    from .sampling import SamplingParams
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              top_k=args.top_k, seed=args.seed)
    SamplingParams(**kw).validate()  # fail on bad options before the (slow) load
    llm = load(args.model, backend=args.backend, dtype=args.dtype, artifacts=args.artifacts)
    if args.ffn_mode:
        llm.set_ffn_mode(args.ffn_mode)
    if args.stream:
        sys.stdout.write(args.prompt)
        for piece in llm.stream(args.prompt, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    out = llm.generate(args.prompt, **kw)
    if args.json:
        print(json.dumps(dict(text=out.text, tokens=len(out.token_ids), finish_reason=out.finish_reason,
                              tokens_per_s=round(out.tokens_per_s, 2), backend=llm.backend,
                              ffn_mode=llm.model.ffn_mode, **llm.model.stats.summary())))
    else:
        print(args.prompt + out.text)


def cmd_info(args):
    import platform

    import torch
    import transformers

    from . import __version__
    from .backends import backend_status
    status = backend_status()
    info = dict(edgesparse=__version__, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, machine=platform.machine(),
                cpu_threads=torch.get_num_threads(),
                backends={n: dict(available=ok, detail=why) for n, (ok, why) in status.items()},
                auto=next(n for n, (ok, _) in status.items() if ok))
    if args.json:
        print(json.dumps(info, indent=1))
        return
    for k, v in info.items():
        if k != "backends":
            print(f"{k:13s} {v}")
    print("backends:")
    for n, (ok, why) in status.items():
        print(f"  {n:5s} {'available' if ok else 'unavailable':11s}  {why}")


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quiet:
        import os
        os.environ["EDGESPARSE_QUIET"] = "1"
    try:
        handler = globals().get(f"cmd_{args.cmd}")
        if handler is None:
            from . import cli_more
            handler = getattr(cli_more, f"cmd_{args.cmd}")
        handler(args)
    except EdgeSparseError as e:
        print(f"edgesparse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgesparse: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
