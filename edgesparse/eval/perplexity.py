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


def eval_ppl(llm, data, window: int = 512, max_tokens: int | None = None, sparse_mode: str | None = None,
             plot: str | None = None) -> dict:
    """Dense and sparse perplexity of ``llm`` on ``data`` files; JSON-ready dict."""
    model = llm.model
    text, summary = read_texts(data)
    windows = token_windows(llm.tokenizer, text, min(window, model.spec.max_positions), max_tokens)
    sparse_mode = sparse_mode or model.ffn_mode
    attn_mode = model.attn_mode
    with model.modes(ffn="dense", attn="dense"):
        dense_nll, n = window_nll(model, windows, False, "dense ppl")
    out = dict(model=llm.name, data=[s["file"] for s in summary], tokens=n, window=windows.shape[1],
               dense_ppl=round(math.exp(dense_nll / n), 4))
    if (sparse_mode, attn_mode) != ("dense", "dense"):
        with model.modes(ffn=sparse_mode):
            model.stats.reset()
            sparse_nll, _ = window_nll(model, windows, True, f"{sparse_mode}/{attn_mode} ppl")
            out.update(ffn_mode=sparse_mode, attn_mode=attn_mode, sparse_ppl=round(math.exp(sparse_nll / n), 4),
                       ppl_gap_pct=round(100 * (math.exp((sparse_nll - dense_nll) / n) - 1), 4))
            if llm.artifacts is not None and llm.artifacts.manifest.get("topk"):
                out["topk"] = llm.artifacts.manifest["topk"]
            if model.stats.total().neurons:
                out.update({k: round(v, 4) for k, v in model.stats.summary().items()})
                out["per_layer"] = [{k: round(v, 4) for k, v in d.items()} for d in model.stats.per_layer()]
                if plot:
                    plot_layers(out["per_layer"], plot, title=f"{llm.name}: {sparse_mode} FFN")
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
