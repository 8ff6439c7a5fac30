"""The ``edgesparse`` command line, every subcommand.  User errors print one line and exit 2
(no traceback)."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import EdgeSparseError, InvalidOptionError

DEMO_PROMPT = "The history of the city"


def _add_model_opts(p, artifacts=True):
    from edgesparse.backends import choices
    from edgesparse.backends.formats import WEIGHT_FORMATS
    p.add_argument("model", help="HF checkpoint dir, .gguf file, hub id org/name[@revision][:FILE.gguf], "
                   "or 'tiny' (the embedded model)")
    p.add_argument("--backend", default="auto", choices=choices())
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="activations and KV cache (default: the checkpoint's own; fp16 runs bf16 on cpu; GGUF: fp32)")
    p.add_argument("--weights", default=None, choices=WEIGHT_FORMATS,
                   help="weight matrices' format (default: the checkpoint's own precision; "
                        "a GGUF file keeps its 8- or 4-bit blocks)")
    if artifacts:
        p.add_argument("--artifacts", default=None, help="calibration artifact dir (from `calibrate`)")


def _load(args, artifacts=None):
    """The model a command names, with its --backend/--dtype/--weights/--artifacts (and --graph)."""
    from ..api import load
    llm = load(args.model, backend=args.backend, dtype=args.dtype, artifacts=artifacts or args.artifacts,
               weights=args.weights)
    if getattr(args, "graph", False):
        llm.set_graph_decode(True)
    return llm


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
    ap = argparse.ArgumentParser(prog="edgesparse", description=__doc__)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="decode a prompt on the embedded model, dense vs sparse")
    p.add_argument("--backend", default="auto")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=_positive_int, default=48)

    p = sub.add_parser("generate", help="complete a prompt")
    _add_model_opts(p)
    p.add_argument("--prompt", required=True, help="the text to complete, or the question to a chat model")
    p.add_argument("--raw", action="store_true",
                   help="complete the prompt as it is, without the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="most tokens to generate (default 64)")
    _add_sampling_opts(p, "greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ffn-mode", choices=["dense", "exact", "predictor"], default=None)
    p.add_argument("--stream", action="store_true")
    _add_graph_opt(p)
    p.add_argument("--json", action="store_true")

    sub.add_parser("info", help="backends, devices, versions").add_argument("--json", action="store_true")

    _add_more_commands(sub)
    return ap


SAMPLING_OPTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _add_sampling_opts(p, fallback: str):
    for name, kind in (("temperature", float), ("top-p", float), ("top-k", int), ("min-p", float),
                       ("repetition-penalty", float)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.epilog = ("Sampling options left out come from the checkpoint's generation_config.json, "
                f"else: {fallback}.")


def _explicit_sampling(args) -> dict:
    """The sampling flags given on the command line, checked before the (slow) load."""
    from ..sampling import SamplingParams
    kw = {k: getattr(args, k) for k in SAMPLING_OPTS if getattr(args, k) is not None}
    SamplingParams(**kw).validate()
    return kw


def cmd_demo(args):
    from ..api import load
    from ..embedded import TINY_ARTIFACTS
    llm = load("tiny", backend=args.backend, artifacts=TINY_ARTIFACTS if TINY_ARTIFACTS.exists() else None)
    sparse_mode = llm.model.ffn_mode
    print(f"edgesparse demo: embedded 'tiny' ReGLU model on backend {llm.backend}")
    print(f"prompt: {args.prompt!r} (greedy, repetition penalty 1.3)\n")
    speed, rows = {}, []
    modes = ("dense", "exact", "predictor") if sparse_mode == "predictor" else ("dense", sparse_mode)
    for mode in modes:
        llm.set_ffn_mode(mode)
        llm.generate(args.prompt, max_new_tokens=4)  # warm-up
        llm.model.stats.reset()
        # greedy with a repetition penalty: a 6M-parameter model's plain greedy text loops
        out = llm.generate(args.prompt, max_new_tokens=args.max_new_tokens, stop_token_ids=[], repetition_penalty=1.3)
        s = llm.model.stats.summary()
        speed[mode] = out.tokens_per_s
        rows.append((mode, out.tokens_per_s, s["ffn_sparsity"], s["gate_sparsity"], out.token_ids))
        print(f"[{mode}] {out.tokens_per_s:.1f} tok/s, FFN sparsity {s['ffn_sparsity']:.1%}"
              + (f", gate rows skipped {s['gate_sparsity']:.1%}" if mode == "predictor" else ""))
        print(args.prompt + out.text + "\n")
    print("mode       tok/s  vs dense  FFN rows skipped  gate rows skipped  text")
    for mode, tps, ffn, gate, ids in rows:
        same = "same as dense" if ids == rows[0][4] else "differs from dense"
        print(f"{mode:9s} {tps:6.0f}  {tps / rows[0][1]:7.2f}x  {ffn:16.1%}  {gate:17.1%}  {same}")
    if max(speed[m] for m in modes[1:]) < speed["dense"]:
        print("note: 'tiny' (d=256, d_ff=1024) is too small for the skipped FFN rows to outweigh the\n"
              "per-op overhead of the sparse path; see `edgesparse bench decode --synthetic tinyllama-1.1b`\n"
              "and docs/performance.md for a model where they do.")


def cmd_generate(args):
    from ..sampling import SamplingParams
    explicit = _explicit_sampling(args)
    SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed).validate()
    llm = _load(args)
    # flags > the checkpoint's generation config > greedy (SamplingParams' own defaults)
    kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, **{**llm.sampling_defaults, **explicit})
    if args.ffn_mode:
        llm.set_ffn_mode(args.ffn_mode)
    # A bare question to a chat model goes through its chat template (without it an instruct
    # model often ends its turn at once); --raw completes the text as it is.
    templated = not args.raw and bool(getattr(llm.tokenizer, "chat_template", None))
    prompt = args.prompt
    if templated:
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}])
        kw["stop_token_ids"] = llm.chat_stop_ids()
    echo = "" if templated else args.prompt   # a completion is printed after its prompt, an answer alone
    if args.stream:
        sys.stdout.write(echo)
        for piece in llm.stream(prompt, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    llm.model.stats.reset()
    out = llm.generate(prompt, **kw)
    if args.json:
        print(json.dumps(dict(text=out.text, tokens=len(out.token_ids), finish_reason=out.finish_reason,
                              tokens_per_s=round(out.tokens_per_s, 2), backend=llm.backend,
                              chat_template=templated, **llm.model.sparsity_in_use())))
    else:
        print(echo + out.text)


def cmd_info(args):
    import platform

    import torch
    import transformers

    from .. import __version__
    from ..backends import backend_status
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


def _add_more_commands(sub):
    from edgesparse.backends.formats import BLOCK_FORMATS
    p = sub.add_parser("calibrate", help="build FFN predictors (and rotations) from calibration text")
    _add_model_opts(p, artifacts=False)
    p.add_argument("-o", "--output", required=True, help="artifact dir to write")
    p.add_argument("--data", nargs="+", default=None, help="text files (default: the embedded corpus)")
    p.add_argument("--tokens", type=_positive_int, default=None)
    p.add_argument("--rank", type=_positive_int, default=None,
                   help="one predictor rank for every layer (default: each layer's rank by the cost model)")
    p.add_argument("--float-predictor", action="store_true",
                   help="keep predictor factors in float (default: per-row int8 grid, half the bytes)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-recall", type=_fraction, default=None)
    g.add_argument("--target-sparsity", type=_fraction, default=None)
    p.add_argument("--attn-sparsity", type=_fraction, default=None, help="Top-K sparsity of attention projections")
    p.add_argument("--mlp-sparsity", type=_fraction, default=None, help="Top-K sparsity of SwiGLU MLPs")
    p.add_argument("--topk-method", choices=["rotated", "magnitude"], default="rotated")
    p.add_argument("--rotation", choices=["shared", "per-site", "global"], default="shared",
                   help="LaRoSA basis: one per layer, one per attention/MLP input, or one for the model")
    p.add_argument("--topk-scaled", action="store_true",
                   help="rank Top-K entries by |x|·||W[:, j]|| instead of |x| (see docs/accuracy.md)")
    p.add_argument("--topk-allocation", default="uniform",
                   help="uniform (the same K in every layer), measured (per-layer K by block errors "
                        "measured on Top-K outputs) or greedy (per-layer K by an estimate)")
    p.add_argument("--topk-spread", type=float, default=None,
                   help="measured allocation: each block's sparsity stays within the asked one ± this")
    p.add_argument("--json", action="store_true")

    ev = sub.add_parser("eval", help="evaluate quality dense vs sparse").add_subparsers(dest="what", required=True)
    p = ev.add_parser("ppl", help="perplexity dense vs sparse")
    _add_model_opts(p)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--window", type=_positive_int, default=512)
    p.add_argument("--max-tokens", type=_positive_int, default=None)
    p.add_argument("--ffn-mode", choices=["dense", "exact", "predictor"], default=None)
    p.add_argument("--plot", default=None, help="PNG of per-layer sparsity and recall")
    p.add_argument("--compare", default=None, metavar="ARTIFACTS",
                   help="other artifacts of the same model: their perplexity on the same windows, paired")
    p.add_argument("--json", action="store_true")

    p = ev.add_parser("zeroshot", help="LAMBADA / PIQA / ARC-Easy / HellaSwag accuracy, dense vs sparse")
    _add_model_opts(p)
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--limit", type=_positive_int, default=200, help="items per task (first N)")
    p.add_argument("--json", action="store_true")

    bs = sub.add_parser("bench", help="speed benchmarks (JSON)").add_subparsers(dest="what", required=True)
    p = bs.add_parser("ffn", help="one FFN layer: dense vs predictor-sparse vs exact-sparse")
    p.add_argument("--shape", default="4096x11008")
    p.add_argument("--sparsity", type=_fraction, default=0.9)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--weights", choices=BLOCK_FORMATS, default=None, help="block-quantised weights")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--rank", type=_positive_int, default=None)
    p.add_argument("--repeats", type=_positive_int, default=15)
    p.add_argument("--json", action="store_true")
    p = bs.add_parser("decode", help="decode tokens/s: transformers vs dense vs sparse")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--synthetic", default=None, help="tinyllama-1.1b")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--weights", choices=BLOCK_FORMATS, default=None, help="block-quantised weights")
    p.add_argument("--new-tokens", type=_positive_int, default=32)
    p.add_argument("--rounds", type=_positive_int, default=3)
    p.add_argument("--rotation", choices=["shared", "per-site", "global"], default="global")
    _add_graph_opt(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("chat", help="multi-turn chat in the terminal, streamed")
    _add_model_opts(p)
    _add_graph_opt(p)
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    _add_sampling_opts(p, "temperature 0.7, top-p 0.9, min-p 0.05, repetition penalty 1.1")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")

    p = sub.add_parser("serve", help="local OpenAI-compatible server")
    _add_model_opts(p)
    _add_graph_opt(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
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


def cmd_calibrate(args):
    from ..sparsity.calibrate import DEFAULT_TOKENS, calibrate
    rep = calibrate(args.model, args.output, data=args.data, backend=args.backend, dtype=args.dtype, weights=args.weights,
                    tokens=args.tokens or DEFAULT_TOKENS, rank=args.rank, target_sparsity=args.target_sparsity,
                    target_recall=args.target_recall, attn_sparsity=args.attn_sparsity,
                    mlp_sparsity=args.mlp_sparsity, topk_method=args.topk_method, rotation=args.rotation,
                    topk_scaled=args.topk_scaled, int8_predictor=not args.float_predictor,
                    topk_allocation=args.topk_allocation, topk_spread=args.topk_spread)
    if "defaults" in rep:   # said on stderr so that --json stays one JSON object on stdout
        d = rep["defaults"]
        print(f"calibrate: {d['why']}: --attn-sparsity {d['attn_sparsity']} --mlp-sparsity {d['mlp_sparsity']} "
              "(give them to choose)", file=sys.stderr)
    if args.json:
        print(json.dumps(rep))
        return
    print(f"wrote {rep['artifacts']} in {rep['seconds']} s")
    if "topk" in rep:
        print(f"top-k: {json.dumps(rep['topk'])}")
    if not rep["layers"]:
        return
    print("layer  mode       rank  gate_skip  recall  precision  natural  predictor_KB  FFN_KB/token")
    for l in rep["layers"]:
        kb = l["bytes"][l["mode"]] / 1024 if "bytes" in l else float("nan")
        print(f"{l['layer']:5d}  {l.get('mode', 'predictor'):9s}  {l['rank']:4d}  {l['gate_sparsity']:9.3f}  "
              f"{l['recall']:6.3f}  {l['precision']:9.3f}  {l['natural_sparsity']:7.3f}  "
              f"{l.get('predictor_bytes', 0) / 1024:12.1f}  {kb:12.1f}")
    print(f"gate rows skipped {rep['gate_sparsity']:.3f} (predictor layers {rep['gate_sparsity_predicted']:.3f}), "
          f"recall {rep['recall']:.4f}, FFN bytes per token {rep['ffn_bytes_vs_dense']:.3f} of dense")


def cmd_eval(args):
    from ..eval.perplexity import eval_ppl
    llm = _load(args)
    if args.what == "zeroshot":
        return _zeroshot(llm, args)
    other = None if args.compare is None else _load(args, artifacts=args.compare)
    out = eval_ppl(llm, args.data, window=args.window, max_tokens=args.max_tokens, sparse_mode=args.ffn_mode,
                   plot=args.plot, compare=other)
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps({k: v for k, v in out.items() if k != "per_layer"}, indent=1))


def cmd_chat(args):
    from .chat import chat_loop
    from ..sampling import CHAT_DEFAULTS
    explicit = _explicit_sampling(args)
    llm = _load(args)
    llm.chat_prompt([{"role": "user", "content": "hi"}])  # fail early without a chat template
    # flags > the checkpoint's generation config > chat defaults
    kw = {**CHAT_DEFAULTS, **llm.sampling_defaults, **explicit}
    chat_loop(llm, max_new_tokens=args.max_new_tokens, seed=args.seed, system=args.system, **kw)


def cmd_serve(args):
    import os

    from .serve import ServeOptions, serve
    key = args.api_key if args.api_key is not None else os.environ.get("EDGESPARSE_API_KEY")
    opts = ServeOptions(host=args.host, port=args.port, api_key=key,
                        allowed_hosts=args.allowed_host, cors_origins=args.cors_origin, max_body_mb=args.max_body_mb,
                        max_queue=args.max_queue, stall_timeout_s=args.stall_timeout,
                        header_timeout_s=args.header_timeout, parallel=args.parallel).validate()
    llm = _load(args)
    print(f"edgesparse: serving {llm.name} ({llm.backend}, ffn mode {llm.model.ffn_mode}, {args.parallel} slot(s)) "
          f"at http://{args.host}:{args.port}/v1", flush=True)
    if not opts.loopback and opts.api_key is None:
        print("edgesparse: warning: listening beyond loopback without --api-key: anyone who can reach "
              "this port can use the model", flush=True)
    serve(llm, opts)


def _zeroshot(llm, args):
    from ..eval.zeroshot import TASKS, eval_zeroshot
    tasks = args.tasks or TASKS
    out = {"model": llm.name, "limit": args.limit, "dense": None, "sparse": None}
    m = llm.model
    modes = (m.ffn_mode, m.attn_mode)
    with m.modes(ffn="dense", attn="dense"):
        out["dense"] = eval_zeroshot(llm, tasks, args.limit, sparse=False)
    if modes != ("dense", "dense"):
        out["sparse"] = eval_zeroshot(llm, tasks, args.limit, sparse=True)
        out["ffn_mode"], out["attn_mode"] = modes
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


def cmd_bench(args):
    if args.what == "ffn":
        from ..benchmarks.ffn import bench_ffn
        out = bench_ffn(args.shape, args.sparsity, args.dtype, args.backend, args.rank, args.repeats, weights=args.weights)
    else:
        from ..benchmarks.decode import bench_decode
        out = bench_decode(args.model, args.synthetic, args.backend, args.dtype, new_tokens=args.new_tokens,
                           rounds=args.rounds, rotation=args.rotation, weights=args.weights, graph=args.graph)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


HANDLERS = {"demo": cmd_demo, "generate": cmd_generate, "info": cmd_info, "calibrate": cmd_calibrate,
            "eval": cmd_eval, "chat": cmd_chat, "serve": cmd_serve, "bench": cmd_bench}


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quiet:
        import os
        os.environ["EDGESPARSE_QUIET"] = "1"
    try:
        HANDLERS[args.cmd](args)
    except EdgeSparseError as e:
        print(f"edgesparse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgesparse: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
