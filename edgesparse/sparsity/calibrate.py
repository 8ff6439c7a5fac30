"""``edgesparse calibrate``: one pass of calibration text, then per-layer predictors.

The calibration windows alternate between two halves: half A accumulates each FFN input's
Gram matrix (for the whitened SVD), half B is kept to calibrate the per-neuron thresholds
on tokens the SVD did not see."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from edgesparse.errors import InvalidOptionError
from edgesparse.eval.data import read_texts, token_windows
from edgesparse.models.taps import observe
from edgesparse.progress import progress
from . import larosa, svd_predictor
from .artifacts import model_fingerprint, save_artifacts

DEFAULT_TOKENS = 16384
DEFAULT_RECALL = 0.99
# A SwiGLU model calibrated with no sparsity asked for: rotated Top-K at this block sparsity in
# attention and MLP (docs/predictors.md, "Defaults").  25% is the level whose perplexity cost
# stays within a few percent on SmolLM2 (docs/accuracy.md); the timed per-layer choice of the
# shapes issue (#37) is to replace this fixed level.
DEFAULT_SWIGLU_TOPK = 0.25


def default_data() -> list[Path]:
    """The embedded model's training corpus (never the WikiText-2 test set)."""
    from edgesparse.embedded.train import CORPUS
    from edgesparse.eval.data import find_data_dir
    d = find_data_dir()
    return [d / name for name in CORPUS]


class _Collector:
    """Reads the tapped block inputs: per tap the Gram matrix over all tokens (for rotations),
    the MLP input's Gram over half A (for the SVD) and half B's MLP inputs (thresholds)."""

    def __init__(self, keep_ffn: bool):
        self.gram, self.gram_a, self.held = {}, {}, {}
        self.keep_ffn = keep_ffn
        self.count_a = 0
        self.half = "A"

    def __call__(self, tap: str, h):
        x = h.reshape(-1, h.shape[-1]).float().cpu()
        g = (x.T @ x).double()   # fp32 per batch (4x faster), accumulated in fp64
        self.gram[tap] = self.gram.get(tap, 0) + g
        if tap.endswith(".mlp_in") and self.keep_ffn:
            if self.half == "A":
                self.gram_a[tap] = self.gram_a.get(tap, 0) + g
            else:
                self.held.setdefault(tap, []).append(x)


def collect(model, windows: torch.Tensor, keep_ffn: bool = True, batch: int = 4) -> _Collector:
    col = _Collector(keep_ffn)
    with torch.inference_mode(), model.modes(ffn="dense", attn="dense"), observe(model, col):
        for j in progress(range(0, len(windows), batch), desc="calibration pass"):
            chunk = windows[j:j + batch].to(model.ex.device)
            # Alternate batches between the halves so both span the whole corpus.
            col.half = "A" if (j // batch) % 2 == 0 else "B"
            if col.half == "A":
                col.count_a += chunk.numel()
            cache = model.new_cache(chunk.shape[0], chunk.shape[1])
            pos = torch.arange(chunk.shape[1], device=chunk.device).expand_as(chunk)
            model.forward(chunk, cache, pos)
    return col


def calibrate_model(model, tokenizer, out, data=None, tokens: int = DEFAULT_TOKENS, rank: int | None = None,
                    target_sparsity: float | None = None, target_recall: float | None = None,
                    attn_sparsity: float | None = None, mlp_sparsity: float | None = None,
                    topk_method: str = "rotated", rotation: str = "shared", topk_scaled: bool = False,
                    window: int = 256, int8_predictor: bool = True, topk_allocation: str = "uniform",
                    topk_spread: float | None = None) -> dict:
    """Calibrate a loaded model and write artifacts to ``out``: FFN predictors for ReGLU
    models (factors on a per-row int8 grid unless ``int8_predictor=False``, see
    ``predictors/int8.py``), and Top-K (LaRoSA-rotated or magnitude) sizes and rotations when
    ``attn_sparsity`` / ``mlp_sparsity`` are given."""
    s = model.spec
    want_topk = attn_sparsity is not None or mlp_sparsity is not None
    defaults = {}
    if not s.is_reglu and not want_topk:   # SVD predictors need a ReGLU FFN: Top-K is what runs here
        attn_sparsity = mlp_sparsity = DEFAULT_SWIGLU_TOPK
        defaults = dict(attn_sparsity=attn_sparsity, mlp_sparsity=mlp_sparsity,
                        why=f"{s.act} model: rotated Top-K at the default level")
        want_topk = True
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
    if topk_allocation not in larosa.ALLOCATIONS:
        raise InvalidOptionError(f"top-k allocation must be one of {', '.join(larosa.ALLOCATIONS)}, "
                                 f"got {topk_allocation!r}")
    if topk_spread is not None and topk_allocation != "measured":
        raise InvalidOptionError("--topk-spread bounds the measured allocation: give --topk-allocation measured")
    if topk_allocation == "measured" and topk_scaled:   # its errors are measured with unscaled Top-K
        raise InvalidOptionError("--topk-allocation measured does not support --topk-scaled")
    if topk_spread is not None and not 0 < topk_spread <= 1:
        raise InvalidOptionError(f"topk spread must be in (0, 1], got {topk_spread}")
    if rotation not in larosa.ROTATIONS:
        raise InvalidOptionError(f"rotation must be one of {', '.join(larosa.ROTATIONS)}, got {rotation!r}")
    if target_sparsity is None and target_recall is None:
        target_recall = DEFAULT_RECALL
    if tokens < 2 * window:
        raise InvalidOptionError(f"tokens must be at least {2 * window} (two windows), got {tokens}")
    if rank is not None and not 1 <= rank <= s.hidden:
        raise InvalidOptionError(f"rank must be in [1, {s.hidden}], got {rank}")
    t0 = time.time()
    text, data_summary = read_texts(data or default_data())
    windows = token_windows(tokenizer, text, min(window, s.max_positions), tokens)
    col = collect(model, windows, keep_ffn=s.is_reglu)
    tensors, layers = {}, []
    if s.is_reglu:
        tensors, layers = svd_predictor.fit(model, col.gram_a, col.held, rank, target_sparsity, target_recall,
                                            int8_predictor)
    manifest = dict(fingerprint=model_fingerprint(model), weights=model.ex.weight_format or "float",
                    calibration=dict(files=data_summary, tokens=int(windows.numel()), window=windows.shape[1],
                                     svd_tokens=col.count_a, threshold_tokens=int(windows.numel()) - col.count_a,
                                     rank=(rank or "per layer") if s.is_reglu else None,
                                     target_sparsity=target_sparsity,
                                     predictor_factors=("int8-rows" if int8_predictor else "float") if s.is_reglu else None,
                                     target_recall=target_recall if s.is_reglu else None),
                    layers=layers)
    if want_topk:
        rot = larosa.fit_rotations(model, col.gram, rotation) if topk_method == "rotated" else None
        tensors.update(rot or {})
        measured = None
        if topk_allocation == "measured":   # per-layer K by block errors measured on real Top-K outputs
            from .topk_allocation import DEFAULT_SPREAD, allocate
            ks, measured = allocate(model, windows, rot, attn_sparsity, mlp_sparsity,
                                    spread=DEFAULT_SPREAD if topk_spread is None else topk_spread)
        elif topk_allocation == "uniform":
            ks = larosa.topk_sizes(s, attn_sparsity, mlp_sparsity)
        else:
            ks = larosa.allocate_topk(model, col.gram, rot, attn_sparsity, mlp_sparsity)
        manifest["topk"] = dict(method=topk_method, rotation=rotation if topk_method == "rotated" else None,
                                scaled=bool(topk_scaled), allocation=topk_allocation,
                                attn_sparsity=attn_sparsity, mlp_sparsity=mlp_sparsity, k=ks)
        if measured is not None:
            manifest["topk"]["measured"] = measured
    path = save_artifacts(out, manifest, tensors)
    rep = dict(artifacts=str(path), seconds=round(time.time() - t0, 1), layers=layers)
    if defaults:
        rep["defaults"] = defaults
    if layers:
        pred = [l for l in layers if l["mode"] == "predictor"] or layers
        rep.update(gate_sparsity=round(sum(l["gate_sparsity"] for l in layers) / len(layers), 4),
                   gate_sparsity_predicted=round(sum(l["gate_sparsity"] for l in pred) / len(pred), 4),
                   recall=round(sum(l["recall"] for l in layers) / len(layers), 4),
                   ffn_bytes_vs_dense=round(sum(l["bytes"][l["mode"]] for l in layers)
                                            / sum(l["bytes"]["dense"] for l in layers), 4))
    if want_topk:
        rep["topk"] = manifest["topk"]
    return rep


def calibrate(model, out, data=None, backend: str = "auto", dtype=None, weights=None, **kw) -> dict:
    """Python API: ``edgesparse.calibrate("tiny", "arts/")`` -> per-layer report dict."""
    from edgesparse.loader import load_model
    m, tok, _, _ = load_model(model, backend=backend, dtype=dtype, weights=weights)
    return calibrate_model(m, tok, out, data=data, **kw)
