"""``edgesparse calibrate``: one pass of calibration text, then per-layer predictors.

The calibration windows alternate between two halves: half A accumulates each FFN input's
Gram matrix (for the whitened SVD), half B is kept to calibrate the per-neuron thresholds
on tokens the SVD did not see."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from edgesparse.predictors.rotation import block_topk_sizes, pca_rotation
from edgesparse.predictors.int8 import snap_factors
from edgesparse.predictors.svd import default_rank, fit_predictor
from edgesparse.predictors.thresholds import calibrate_thresholds
from .artifacts import model_fingerprint, save_artifacts
from .errors import InvalidOptionError
from .progress import progress
from .eval.data import read_texts, token_windows

DEFAULT_TOKENS = 16384
DEFAULT_RECALL = 0.99


def default_data() -> list[Path]:
    """The embedded model's training corpus (never the WikiText-2 test set)."""
    from .embedded.train import CORPUS
    from .eval.data import find_data_dir
    d = find_data_dir()
    return [d / name for name in CORPUS]


class _Collector:
    """Observer of the normed block inputs: per (layer, site) the Gram matrix over all tokens
    (for rotations), the FFN input's Gram over half A (for the SVD) and half B's FFN inputs
    (for the thresholds)."""

    def __init__(self, keep_ffn: bool):
        self.gram, self.gram_a, self.held = {}, {}, {}
        self.keep_ffn = keep_ffn
        self.count_a = 0
        self.half = "A"

    def __call__(self, layer, site, h, valid):
        x = h.reshape(-1, h.shape[-1]).float().cpu()
        key = (layer, site)
        g = (x.T @ x).double()   # fp32 per batch (4x faster), accumulated in fp64
        self.gram[key] = self.gram.get(key, 0) + g
        if site == "mlp_in" and self.keep_ffn:
            if self.half == "A":
                self.gram_a[key] = self.gram_a.get(key, 0) + g
            else:
                self.held.setdefault(key, []).append(x)


def collect(model, windows: torch.Tensor, keep_ffn: bool = True, batch: int = 4) -> _Collector:
    col = _Collector(keep_ffn)
    model.observer = col
    try:
        with torch.inference_mode(), model.modes(ffn="dense", attn="dense"):
            for j in progress(range(0, len(windows), batch), desc="calibration pass"):
                chunk = windows[j:j + batch].to(model.ex.device)
                # Alternate batches between the halves so both span the whole corpus.
                col.half = "A" if (j // batch) % 2 == 0 else "B"
                if col.half == "A":
                    col.count_a += chunk.numel()
                cache = model.new_cache(chunk.shape[0], chunk.shape[1])
                pos = torch.arange(chunk.shape[1], device=chunk.device).expand_as(chunk)
                model.forward(chunk, cache, pos)
    finally:
        model.observer = None
    return col


def fit_ffn_predictors(model, col, rank, target_sparsity, target_recall, int8: bool = True):
    tensors, layers = {}, []
    for i, layer in enumerate(progress(model.layers, desc="fitting predictors")):
        key = (i, "mlp_in")
        gate_w = layer.ffn.gate.float().cpu()
        a, b = fit_predictor(gate_w, rank, col.gram_a[key])
        if int8:   # thresholds below are then fitted to the predictor that will run
            a, b = snap_factors(a, b)
        x = torch.cat(col.held[key])
        gate = x @ gate_w.T
        res = calibrate_thresholds(x @ a @ b, gate, x @ layer.ffn.up.float().cpu().T,
                                   layer.ffn.down_t.float().cpu().norm(dim=1),
                                   target_sparsity=target_sparsity, target_recall=target_recall)
        tensors.update({f"layers.{i}.predictor.a": a, f"layers.{i}.predictor.b": b,
                        f"layers.{i}.predictor.bias": res.bias.float()})
        layers.append(dict(layer=i, rank=rank, gate_sparsity=round(res.skip_share, 4),
                           recall=round(res.recall, 4), precision=round(res.precision, 4),
                           weighted_recall=round(res.weighted_recall, 5),
                           natural_sparsity=round((gate <= 0).float().mean().item(), 4)))
    return tensors, layers


ROTATIONS = ("shared", "per-site", "global")


def fit_rotations(model, col, rotation: str = "shared") -> dict:
    """LaRoSA Q per layer and site from the Gram of the norm output without its weight.

    ``shared``: one Q per layer for its attention and MLP inputs (one residual adapter per
    layer); ``per-site``: one Q per input (two adapters per layer); ``global``: one Q for the
    whole model from the pooled statistics (no adapters at all, only the two end rotations)."""
    grams = {}
    for i, layer in enumerate(model.layers):
        for site, norm in (("attn_in", layer.attn_norm), ("mlp_in", layer.mlp_norm)):
            inv = 1 / norm.double().cpu().abs().clamp(min=1e-6) * norm.double().cpu().sign()
            g = col.gram[(i, site)] * inv[:, None] * inv[None, :]
            grams[(i, site)] = g / g.trace()
    if rotation == "global":
        q = pca_rotation(sum(grams.values()))
    tensors = {}
    for i in range(len(model.layers)):
        if rotation == "per-site":
            qa, qm = pca_rotation(grams[(i, "attn_in")]), pca_rotation(grams[(i, "mlp_in")])
        elif rotation == "shared":
            qa = qm = pca_rotation(grams[(i, "attn_in")] + grams[(i, "mlp_in")])
        else:
            qa = qm = q
        tensors[f"layers.{i}.rotation.attn"] = qa.float()
        tensors[f"layers.{i}.rotation.mlp"] = qm.float()
    return tensors


def topk_sizes(spec, attn_sparsity, mlp_sparsity) -> dict:
    nq, nkv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    k_qkv, k_o = block_topk_sizes(attn_sparsity or 0.0, spec.hidden, nq + 2 * nkv, nq, spec.hidden)
    ks = {"qkv": k_qkv, "o": k_o}
    if not spec.is_reglu:
        ks["mlp"], ks["down"] = block_topk_sizes(mlp_sparsity or 0.0, spec.hidden, 2 * spec.intermediate,
                                                 spec.intermediate, spec.hidden)
    return ks


def calibrate_model(model, tokenizer, out, data=None, tokens: int = DEFAULT_TOKENS, rank: int | None = None,
                    target_sparsity: float | None = None, target_recall: float | None = None,
                    attn_sparsity: float | None = None, mlp_sparsity: float | None = None,
                    topk_method: str = "rotated", rotation: str = "shared", topk_scaled: bool = False,
                    window: int = 256, int8_predictor: bool = True) -> dict:
    """Calibrate a loaded model and write artifacts to ``out``: FFN predictors for ReGLU
    models (factors on a per-row int8 grid unless ``int8_predictor=False``, see
    ``predictors/int8.py``), and Top-K (LaRoSA-rotated or magnitude) sizes and rotations when
    ``attn_sparsity`` / ``mlp_sparsity`` are given."""
    s = model.spec
    want_topk = attn_sparsity is not None or mlp_sparsity is not None
    if not s.is_reglu and not want_topk:
        raise InvalidOptionError("SVD predictors need a ReGLU model (hidden_act=relu); for this "
                                 f"{s.act} model give --attn-sparsity/--mlp-sparsity for Top-K")
    if mlp_sparsity is not None and s.is_reglu:
        raise InvalidOptionError("--mlp-sparsity is for SwiGLU models; ReGLU FFNs use the SVD predictors")
    if target_sparsity is not None and target_recall is not None:
        raise InvalidOptionError("give --target-sparsity or --target-recall, not both")
    for name, v in (("target_sparsity", target_sparsity), ("target_recall", target_recall),
                    ("attn_sparsity", attn_sparsity), ("mlp_sparsity", mlp_sparsity)):
        if v is not None and not 0 < v < 1:
            raise InvalidOptionError(f"{name} must be in (0, 1), got {v}")
    if topk_method not in ("rotated", "magnitude"):
        raise InvalidOptionError(f"topk method must be rotated or magnitude, got {topk_method!r}")
    if rotation not in ROTATIONS:
        raise InvalidOptionError(f"rotation must be one of {', '.join(ROTATIONS)}, got {rotation!r}")
    if target_sparsity is None and target_recall is None:
        target_recall = DEFAULT_RECALL
    if tokens < 2 * window:
        raise InvalidOptionError(f"tokens must be at least {2 * window} (two windows), got {tokens}")
    rank = rank or default_rank(s.hidden)
    if not 1 <= rank <= s.hidden:
        raise InvalidOptionError(f"rank must be in [1, {s.hidden}], got {rank}")
    t0 = time.time()
    text, data_summary = read_texts(data or default_data())
    windows = token_windows(tokenizer, text, min(window, s.max_positions), tokens)
    col = collect(model, windows, keep_ffn=s.is_reglu)
    tensors, layers = {}, []
    if s.is_reglu:
        tensors, layers = fit_ffn_predictors(model, col, rank, target_sparsity, target_recall, int8_predictor)
    manifest = dict(fingerprint=model_fingerprint(model),
                    calibration=dict(files=data_summary, tokens=int(windows.numel()), window=windows.shape[1],
                                     svd_tokens=col.count_a, threshold_tokens=int(windows.numel()) - col.count_a,
                                     rank=rank if s.is_reglu else None, target_sparsity=target_sparsity,
                                     predictor_factors=("int8-rows" if int8_predictor else "float") if s.is_reglu else None,
                                     target_recall=target_recall if s.is_reglu else None),
                    layers=layers)
    if want_topk:
        if topk_method == "rotated":
            tensors.update(fit_rotations(model, col, rotation))
        manifest["topk"] = dict(method=topk_method, rotation=rotation if topk_method == "rotated" else None,
                                scaled=bool(topk_scaled),
                                attn_sparsity=attn_sparsity, mlp_sparsity=mlp_sparsity,
                                k=topk_sizes(s, attn_sparsity, mlp_sparsity))
    path = save_artifacts(out, manifest, tensors)
    rep = dict(artifacts=str(path), seconds=round(time.time() - t0, 1), layers=layers)
    if layers:
        rep.update(gate_sparsity=round(sum(l["gate_sparsity"] for l in layers) / len(layers), 4),
                   recall=round(sum(l["recall"] for l in layers) / len(layers), 4))
    if want_topk:
        rep["topk"] = manifest["topk"]
    return rep


def calibrate(model, out, data=None, backend: str = "auto", dtype=None, **kw) -> dict:
    """Python API: ``edgesparse.calibrate("tiny", "arts/")`` -> per-layer report dict."""
    from .loader import load_model
    m, tok, _, _ = load_model(model, backend=backend, dtype=dtype)
    return calibrate_model(m, tok, out, data=data, **kw)
