"""Screening (not CI): three training-free levers that might lower rotated Top-K's error per
dropped weight on SmolLM2 Q4_1, each against today's uniform rotated Top-K, paired per window.

    python bench/topk_levers_screen.py [EVAL_TOKENS=4096] [--out bench/results/smollm2_topk_levers.json]

1. *Thresholds* (TEAL-style, a per-token K): each Top-K input gets a magnitude threshold
   fitted so that the calibration text keeps K entries on average (fitted on the thresholded
   model itself, two refits).  On other text the kept count drifts, so the result is compared
   both with fixed K at the asked level and with fixed K at the level the thresholds actually
   reached on the test text.
2. *Gate-first MLP*: the rotated Top-K gate|up as today, then up kept only for the neurons with
   the largest |silu(gate)| and down's Top-K over those; the saved up bytes buy a larger input
   K.  Its byte count assumes a kernel could skip (neuron, input) pairs inside Wᵀ's rows, which
   the input-major layout cannot: the figure is an upper bound for the idea.
3. *The first token dense*: the attention-sink position of each window computed densely (as a
   prompt's is in use), every later token sparse.
4. *Low-rank compensation* (R-Sparse-like): the dropped inputs' contribution through a rank-r
   SVD of the rotated weight, against spending the same bytes on a larger K; relative output
   error of qkv and gate|up on held-out calibration tokens (every third layer).

One calibration (8,192 tokens of the embedded corpus, shared rotations); WikiText-2 test text."""
import argparse
import copy
import json
import math
import time
import types

import torch
import torch.nn.functional as F

import edgesparse
import edgesparse.models.weights as model_weights
from edgesparse.eval.data import find_data_dir, read_texts, token_windows
from edgesparse.eval.perplexity import window_nll
from edgesparse.models.taps import observe
from edgesparse.predictors.rotation import pca_rotation
from edgesparse.sparsity.calibrate import collect, default_data
from edgesparse.sparsity.larosa import _float_layer, fit_rotations, install_topk, rotations_from_tensors, topk_sizes

MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
GATE_FIRST = {0.4: [(0.3, 0.8, 0.54), (0.25, 0.75, 0.49)], 0.5: [(0.4, 0.75, 0.45), (0.4, 0.8, 0.42)]}


def paired(per, base, n_tok):
    d = (torch.tensor(per, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64)) * len(per) / n_tok
    return round(d.mean().item(), 5), round((d.std() / len(d) ** 0.5).item(), 5)


def run(model, windows, n, dense, base=None, desc="eval"):
    per = []
    nll, _ = window_nll(model, windows, True, desc, per)
    out = dict(ppl=round(math.exp(nll / n), 3), gap_pct=round(100 * (math.exp((nll - dense) / n) - 1), 2))
    if base is not None:
        out["vs_uniform"], out["se"] = paired(per, base, n)
    return out, per


def fit_thresholds(mm, cwin, refits=2):
    """Per Top-K input, the |x| threshold that keeps K entries on average on calibration text."""
    ex, orig = mm.ex, type(mm.ex).topk_linear
    thr = {}
    for it in range(refits + 1):
        seen = {}

        def record(self, x, w, k=None):
            a = x.abs().float()
            seen.setdefault(id(w), [w, []])[1].append(a[torch.randperm(a.shape[0])[:64]])
            keep = x if it == 0 else x * (x.abs() > thr[id(w)])   # pass 0: dense inputs
            return orig(self, keep, w, w.weight_t.shape[0])
        ex.topk_linear = types.MethodType(record, ex)
        with torch.inference_mode():
            for j in range(0, 32, 4):
                c = cwin[j:j + 4]
                mm.forward(c, mm.new_cache(c.shape[0], c.shape[1]), torch.arange(c.shape[1]).expand_as(c),
                           sparse_prefill=True)
        for key, (w, xs) in seen.items():
            a = torch.cat(xs).flatten()
            thr[key] = a.kthvalue(max(1, int(a.numel() * (1 - w.k / w.weight_t.shape[0])))).values.item()
    ex.topk_linear = types.MethodType(orig, ex)
    return thr


def thresholded(mm, thr, counts):
    ex, orig = mm.ex, type(mm.ex).topk_linear

    def apply(self, x, w, k=None):
        if k is not None and k >= w.weight_t.shape[0]:
            return orig(self, x, w, k)
        mask = x.abs() > thr[id(w)]
        c = counts.setdefault(id(w), [0, 0, w.weight_t.shape[0], w.weight_t.shape[1]])
        c[0] += mask.sum().item()
        c[1] += mask.shape[0]
        return orig(self, x * mask, w, w.weight_t.shape[0])
    ex.topk_linear = types.MethodType(apply, ex)


def realised_sparsity(counts):
    read = sum(kept / tok * d_out for kept, tok, d_in, d_out in counts.values())
    return 1 - read / sum(d_in * d_out for _, _, d_in, d_out in counts.values())


def first_dense(mm, windows, n, dense, base, head=1):
    """Per-window NLL with the first ``head`` positions dense and the rest sparse."""
    tot, per = 0.0, []
    with torch.inference_mode():
        for w in windows:
            ids, T = w[None], w.shape[0]
            cache, pos = mm.new_cache(1, T), torch.arange(T)[None]
            logits = torch.cat([mm.forward(ids[:, :head], cache, pos[:, :head], all_logits=True),
                                mm.forward(ids[:, head:], cache, pos[:, head:], all_logits=True, sparse_prefill=True)], 1)
            per.append(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item())
            tot += per[-1]
    out = dict(ppl=round(math.exp(tot / n), 3), gap_pct=round(100 * (math.exp((tot - dense) / n) - 1), 2))
    out["vs_uniform"], out["se"] = paired(per, base, n)
    return out


def gate_first(cfg):
    sg, f1, f2 = cfg

    def mlp(ex, x, w, sparse):
        if not sparse:
            return model_weights_topk_mlp(ex, x, w, sparse)
        d, dff = x.shape[-1], w.down.weight_t.shape[0]
        gu = ex.topk_linear(x, w.gate_up, round((1 - sg) * d))
        s = F.silu(gu[..., :dff])
        idx = s.abs().topk(round(f1 * dff), dim=-1).indices
        h = s * gu[..., dff:] * torch.zeros_like(s).scatter_(-1, idx, 1.0)
        return ex.topk_linear(h, w.down, round(f2 * dff))
    return mlp


model_weights_topk_mlp = model_weights.topk_mlp


def lowrank_errors(m, cwin, level, tokens=4096):
    xs = {}
    with torch.inference_mode(), m.modes(ffn="dense", attn="dense"), \
            observe(m, lambda tap, h: xs.setdefault(tap, []).append(h.reshape(-1, h.shape[-1]).double())):
        for j in range(0, tokens // cwin.shape[1], 4):
            c = cwin[j:j + 4]
            m.forward(c, m.new_cache(c.shape[0], c.shape[1]), torch.arange(c.shape[1]).expand_as(c))
    ks, out = topk_sizes(m.spec, level, level), {}
    for i, layer in enumerate(m.layers):
        if i % 3:
            continue
        mats = _float_layer(m, i, layer)
        for site, tap, norm, w, k in (
                ("qkv", "attn_in", layer.attn.norm, mats["qkv"], ks["qkv"]),
                ("gate_up", "mlp_in", layer.mlp.norm, torch.cat([mats["gate"], mats["up"]]), ks["mlp"])):
            u = torch.cat(xs[f"layers.{i}.{tap}"]) / norm.double()
            half = u.shape[0] // 2   # rotation from the first half, errors on the second
            q = pca_rotation(u[:half].T @ u[:half])
            wq, z = (w * norm.double()) @ q, u[half:] @ q
            ny = (z @ wq.T).pow(2).sum()
            uu, sv, vh = torch.linalg.svd(wq, full_matrices=False)

            def dropped(kk):
                idx = z.abs().topk(min(kk, z.shape[1]), dim=1).indices
                return z - torch.zeros_like(z).scatter_(1, idx, z.gather(1, idx))
            e = dict(top_k=((dropped(k) @ wq.T).pow(2).sum() / ny).item())
            for r in (16, 32, 64):
                lr = uu[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
                e[f"top_k + rank {r}"] = ((dropped(k) @ (wq - lr).T).pow(2).sum() / ny).item()
                dk = round(r * (w.shape[0] + w.shape[1]) / w.shape[0])   # the bytes of rank r
                e[f"top_(k+{dk}), same bytes as rank {r}"] = ((dropped(k + dk) @ wq.T).pow(2).sum() / ny).item()
            for key, v in e.items():
                out.setdefault(site, {}).setdefault(key, []).append(v)
    return {s: {k: round(sum(v) / len(v), 5) for k, v in d.items()} for s, d in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tokens", nargs="?", type=int, default=4096)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.time()
    llm = edgesparse.load(MODEL, backend="cpu")
    llm.set_ffn_mode("dense")
    m = llm.model
    text, _ = read_texts(default_data())
    cwin = token_windows(llm.tokenizer, text, 256, 8192)
    col = collect(m, cwin, keep_ffn=False)
    rot = rotations_from_tensors(fit_rotations(m, col.gram, "shared"), m.spec.n_layers)
    del col
    wtext, _ = read_texts([find_data_dir() / "wikitext-2-raw-test.txt"])
    windows = token_windows(llm.tokenizer, wtext, 512, a.tokens)
    dense, n = window_nll(m, windows, False, "dense")
    res = dict(model=MODEL, eval_tokens=n, dense_ppl=round(math.exp(dense / n), 3), levels={})
    for level in (0.4, 0.5):
        r = res["levels"][str(level)] = {}
        mm = copy.deepcopy(m)
        install_topk(mm, topk_sizes(m.spec, level, level), *rot)
        r["uniform"], base = run(mm, windows, n, dense, desc=f"uniform {level}")
        r["first token dense"] = first_dense(mm, windows, n, dense, base)
        for cfg in GATE_FIRST[level]:
            model_weights.topk_mlp = gate_first(cfg)
            r[f"gate_first in{cfg[0]} up{cfg[1]} down{cfg[2]}"], _ = run(mm, windows, n, dense, base, "gate-first")
        model_weights.topk_mlp = model_weights_topk_mlp
        counts = {}
        thresholded(mm, fit_thresholds(mm, cwin), counts)
        r["thresholds"], _ = run(mm, windows, n, dense, base, "thresholds")
        reached = realised_sparsity(counts)
        r["thresholds"]["realised_sparsity_on_test"] = round(reached, 4)
        del mm
        mm = copy.deepcopy(m)
        install_topk(mm, topk_sizes(m.spec, reached, reached), *rot)
        fixed, _ = run(mm, windows, n, dense, desc="fixed at reached")
        r[f"uniform at {reached:.4f}"] = fixed
        del mm
        print(json.dumps({level: r}), flush=True)
    res["lowrank_site_error"] = {str(lv): lowrank_errors(m, cwin, lv) for lv in (0.4, 0.5)}
    res["seconds"] = round(time.time() - t0)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
