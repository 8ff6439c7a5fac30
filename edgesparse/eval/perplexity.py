"""``edgesparse eval ppl``: perplexity dense vs sparse on the same windows.

The sparse pass applies the decode-time FFN mode to every token (per-token active sets,
never a union over the window), so its perplexity is what decoding would see."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..progress import progress
from .data import read_texts, token_windows


def window_nll(model, windows: torch.Tensor, sparse: bool, desc: str,
               per_window: list | None = None) -> tuple[float, int]:
    """Summed next-token NLL and token count over ``windows``; each window's sum is appended
    to ``per_window`` when given (for paired comparisons of two models)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in progress(windows, desc=desc):
            ids = w[None].to(model.ex.device)
            cache = model.new_cache(1, ids.shape[1])
            pos = torch.arange(ids.shape[1], device=ids.device)[None]
            logits = model.forward(ids, cache, pos, all_logits=True, sparse_prefill=sparse)
            nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device), reduction="sum").item()
            total += nll
            if per_window is not None:
                per_window.append(nll)
            count += ids.shape[1] - 1
    return total, count


def paired(nll_a: list[float], nll_b: list[float], tokens_per_window: int) -> dict:
    """B against A on the same windows: the mean per-token NLL difference (B - A; negative:
    B is better), its 95% interval over windows, and the share of windows where B is better.
    Two methods whose perplexities differ by less than the noise of one run are told apart
    only this way: each window's difficulty cancels in the difference."""
    d = torch.tensor(nll_b, dtype=torch.float64) - torch.tensor(nll_a, dtype=torch.float64)
    d = d / tokens_per_window
    half = 1.96 * d.std().item() / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return dict(windows=len(d), nll_diff_per_token=round(d.mean().item(), 6),
                ci95=[round(d.mean().item() - half, 6), round(d.mean().item() + half, 6)],
                b_better_share=round((d < 0).double().mean().item(), 4),
                significant=bool(abs(d.mean().item()) > half))


def eval_ppl(llm, data, window: int = 512, max_tokens: int | None = None, sparse_mode: str | None = None,
             plot: str | None = None, compare=None) -> dict:
    """Dense and sparse perplexity of ``llm`` on ``data`` files, with the paired per-window
    comparison of sparse against dense; with ``compare`` (a second LLM: the same model with
    other artifacts) also its sparse perplexity and the paired comparison against ``llm``'s
    sparse one.  JSON-ready dict."""
    model = llm.model
    text, summary = read_texts(data)
    windows = token_windows(llm.tokenizer, text, min(window, model.spec.max_positions), max_tokens)
    sparse_mode = sparse_mode or model.ffn_mode
    attn_mode = model.attn_mode
    per = {"dense": []}
    with model.modes(ffn="dense", attn="dense"):
        dense_nll, n = window_nll(model, windows, False, "dense ppl", per["dense"])
    tpw = windows.shape[1] - 1
    out = dict(model=llm.name, data=[s["file"] for s in summary], tokens=n, window=windows.shape[1],
               dense_ppl=round(math.exp(dense_nll / n), 4))
    if (sparse_mode, attn_mode) != ("dense", "dense"):
        with model.modes(ffn=sparse_mode):
            model.stats.reset()
            per["sparse"] = []
            sparse_nll, _ = window_nll(model, windows, True, f"{sparse_mode}/{attn_mode} ppl", per["sparse"])
            out.update(ffn_mode=sparse_mode, attn_mode=attn_mode, sparse_ppl=round(math.exp(sparse_nll / n), 4),
                       ppl_gap_pct=round(100 * (math.exp((sparse_nll - dense_nll) / n) - 1), 4),
                       sparse_vs_dense=paired(per["dense"], per["sparse"], tpw))
            if llm.artifacts is not None and llm.artifacts.manifest.get("topk"):
                out["topk"] = llm.artifacts.manifest["topk"]
            if model.stats.total().neurons:
                out.update({k: round(v, 4) for k, v in model.stats.summary().items()})
                out["per_layer"] = [{k: round(v, 4) for k, v in d.items()} for d in model.stats.per_layer()]
                if plot:
                    plot_layers(out["per_layer"], plot, title=f"{llm.name}: {sparse_mode} FFN")
    if compare is not None:
        other, per_b = compare.model, []
        nll_b, _ = window_nll(other, windows, other.ffn_mode != "dense" or other.attn_mode != "dense",
                              "compared ppl", per_b)
        out["compared"] = dict(ffn_mode=other.ffn_mode, attn_mode=other.attn_mode,
                               ppl=round(math.exp(nll_b / n), 4),
                               ppl_gap_pct=round(100 * (math.exp((nll_b - dense_nll) / n) - 1), 4),
                               vs_sparse=paired(per.get("sparse", per["dense"]), per_b, tpw))
    return out


def plot_layers(per_layer: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [d["layer"] for d in per_layer]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("natural_sparsity", "k--"), ("ffn_sparsity", "o-"), ("gate_sparsity", "s-"),
                       ("predictor_recall", "^-")):
        if key in per_layer[0]:
            ax.plot(x, [d[key] for d in per_layer], style, label=key)
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
