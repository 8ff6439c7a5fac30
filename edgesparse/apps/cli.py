"""The ``edgesparse`` command line, every subcommand.  User errors print one line and exit 2
(no traceback)."""
from __future__ import annotations

import json
import sys

from ..errors import EdgeSparseError

from .cli_parser import SAMPLING_OPTS, build_parser


def _load(args, artifacts=None):
    """The model a command names, with its --backend/--dtype/--weights/--artifacts (and --graph)."""
    from ..api import load
    llm = load(args.model, backend=args.backend, dtype=args.dtype, artifacts=artifacts or args.artifacts,
               weights=args.weights)
    if getattr(args, "graph", False):
        llm.set_graph_decode(True)
    return llm

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

    from importlib.metadata import version

    from .. import __version__
    from ..backends import backend_status
    from ..backends.cpu import native
    status = backend_status()
    info = dict(edgesparse=__version__, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, gguf=version("gguf"),
                machine=platform.machine(), cpu_threads=torch.get_num_threads(),
                native=native.variant(),
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
                           rounds=args.rounds, rotation=args.rotation, weights=args.weights, graph=args.graph,
                           ffn_gate_sparsity=args.gate_sparsity, attn_sparsity=args.attn_sparsity)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


HANDLERS = {"demo": cmd_demo, "generate": cmd_generate, "info": cmd_info, "env": cmd_info, "calibrate": cmd_calibrate,
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
