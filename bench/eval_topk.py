"""Rotated (LaRoSA) vs magnitude (TEAL-style) Top-K on one model, in one run.

    python bench/eval_topk.py MODEL [--levels 0.25 0.4 0.5] [--ppl-tokens 16384] \
        [--zeroshot-levels 0.25 0.4 --zeroshot-limit 100] [--out bench/results/topk.json]

Calibrates once (the rotations do not depend on the sparsity level), then for every level
and method installs Top-K on a copy of the model and measures WikiText-2 perplexity
(512-token windows) and, optionally, zero-shot accuracy.  Prints JSON and writes a PNG plot
of perplexity vs sparsity."""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

import edgesparse
from edgesparse.sparsity.calibrate import collect, default_data
from edgesparse.sparsity.larosa import fit_rotations, install_topk, rotations_from_tensors, topk_sizes
from edgesparse.eval.data import find_data_dir
from edgesparse.eval.perplexity import window_nll
from edgesparse.eval.data import read_texts, token_windows
from edgesparse.eval.zeroshot import eval_zeroshot


def variants(rots, level, spec, scaled_too):
    """TEAL-style magnitude and paper-style rotated Top-K, then both with contribution
    scaling (|x_j|·||W[:, j]||), for every rotation option."""
    ks = topk_sizes(spec, level, None if spec.is_reglu else level)
    first = next(iter(rots))
    yield "magnitude", ks, None, False
    yield first, ks, rots[first], False
    if scaled_too:
        yield "magnitude+scaled", ks, None, True
        for name, rot in rots.items():
            yield name + "+scaled", ks, rot, True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.4, 0.5])
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--zeroshot-levels", type=float, nargs="*", default=[])
    ap.add_argument("--zeroshot-limit", type=int, default=100)
    ap.add_argument("--rotations", nargs="+", default=["rotated-shared", "rotated-per-site", "rotated-global"])
    ap.add_argument("--no-scaled", dest="scaled", action="store_false",
                    help="skip the column-norm-scaled variants")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    llm = edgesparse.load(args.model, backend="cpu")
    llm.set_ffn_mode("dense")
    m = llm.model
    text, _ = read_texts(default_data())
    col = collect(m, token_windows(llm.tokenizer, text, 256, args.calib_tokens), keep_ffn=False)
    rots = {}
    for name in args.rotations:
        t = fit_rotations(m, col.gram, name.removeprefix("rotated-"))
        rots[name] = rotations_from_tensors(t, m.spec.n_layers)
    del col
    wtext, _ = read_texts([find_data_dir() / "wikitext-2-raw-test.txt"])
    windows = token_windows(llm.tokenizer, wtext, 512, args.ppl_tokens)
    dense_nll, n = window_nll(m, windows, False, "dense")
    res = {"model": llm.name, "tokens": n, "window": 512, "dense_ppl": round(math.exp(dense_nll / n), 3),
           "ppl": {}, "zeroshot": {}}
    if args.zeroshot_levels:
        res["zeroshot"]["dense"] = eval_zeroshot(llm, limit=args.zeroshot_limit, sparse=False)
    nlls = {}
    for level in args.levels:
        for name, ks, rot, scaled in variants(rots, level, m.spec, args.scaled):
            mm = copy.deepcopy(m)
            install_topk(mm, ks, *(rot or (None, None)), scaled=scaled)
            per = []
            nll, _ = window_nll(mm, windows, True, f"{name}@{level}", per)
            nlls.setdefault(str(level), {})[name] = per
            ppl = math.exp(nll / n)
            res["ppl"].setdefault(name, {})[str(level)] = round(ppl, 3)
            print(json.dumps({"method": name, "level": level, "ppl": round(ppl, 3), "k": ks}), file=sys.stderr)
            if level in args.zeroshot_levels:
                shadow = copy.copy(llm)
                shadow.model = mm
                res["zeroshot"].setdefault(name, {})[str(level)] = eval_zeroshot(
                    shadow, limit=args.zeroshot_limit, sparse=True)
            del mm
    res["paired_vs_magnitude"] = paired(nlls, n, len(windows))
    res["seconds"] = round(time.time() - t0, 1)
    out = json.dumps(res, indent=1)
    print(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(out)
        plot(res, str(Path(args.out).with_suffix(".png")))


def paired(nlls, n_tokens, n_windows):
    """Per level, every method against magnitude Top-K on the same windows: the mean NLL
    difference per token with its standard error over windows (negative = better than
    magnitude) and the number of windows where the method is better."""
    out = {}
    for level, by in nlls.items():
        base = torch.tensor(by["magnitude"], dtype=torch.float64)
        for name, per in by.items():
            if name == "magnitude":
                continue
            diff = (torch.tensor(per, dtype=torch.float64) - base) * n_windows / n_tokens
            out.setdefault(name, {})[level] = dict(
                mean_nll_diff=round(diff.mean().item(), 5),
                stderr=round((diff.std() / n_windows**0.5).item(), 5) if n_windows > 1 else None,
                windows_better=int((diff < 0).sum()), windows=n_windows)
    return out


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in res["ppl"].items():
        xs = sorted(pts, key=float)
        ax.plot([float(x) for x in xs], [pts[x] for x in xs], "o-", label=name)
    ax.axhline(res["dense_ppl"], color="k", ls="--", label="dense")
    ax.set_xlabel("model-level Top-K sparsity")
    ax.set_ylabel(f"WikiText-2 PPL ({res['tokens']} tokens, 512 windows)")
    ax.set_title(res["model"])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
