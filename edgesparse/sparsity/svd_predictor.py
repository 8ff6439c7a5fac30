"""SVD predictors of ReGLU gates: fit (whitened truncated SVD, int8 factors, per-neuron
thresholds) and apply (put the predictors on a loaded model's ReGLUMLP layers).

The math lives in ``predictors/`` (pure fitting, no model); this module binds it to layers."""
from __future__ import annotations

import torch

from edgesparse.errors import ArtifactError
from edgesparse.models.weights import ReGLUMLP
from edgesparse.predictors.int8 import snap_factors
from edgesparse.predictors.svd import fit_predictor
from edgesparse.predictors.thresholds import calibrate_thresholds
from edgesparse.progress import progress


def fit(model, gram_a: dict, held: dict, rank: int, target_sparsity, target_recall, int8: bool = True):
    """Per layer: the SVD of the gate whitened by ``gram_a[tap]`` (the MLP input's Gram over the
    calibration half A), then thresholds fitted on ``held[tap]`` (half B's MLP inputs).
    Returns ``(artifact tensors, per-layer report)``."""
    tensors, layers = {}, []
    for i, layer in enumerate(progress(model.layers, desc="fitting predictors")):
        tap, ffn = f"layers.{i}.mlp_in", layer.mlp.ffn
        gate_w = ffn.gate.float().cpu()
        a, b = fit_predictor(gate_w, rank, gram_a[tap])
        if int8:   # thresholds below are then fitted to the predictor that will run
            a, b = snap_factors(a, b)
        x = torch.cat(held[tap])
        gate = x @ gate_w.T
        res = calibrate_thresholds(x @ a @ b, gate, x @ ffn.up.float().cpu().T,
                                   ffn.down_t.float().cpu().norm(dim=1),
                                   target_sparsity=target_sparsity, target_recall=target_recall)
        tensors.update({f"layers.{i}.predictor.a": a, f"layers.{i}.predictor.b": b,
                        f"layers.{i}.predictor.bias": res.bias.float()})
        layers.append(dict(layer=i, rank=rank, gate_sparsity=round(res.skip_share, 4),
                           recall=round(res.recall, 4), precision=round(res.precision, 4),
                           weighted_recall=round(res.weighted_recall, 5),
                           natural_sparsity=round((gate <= 0).float().mean().item(), 4)))
    return tensors, layers


def apply(model, tensors: dict) -> bool:
    """Install the predictors found in ``tensors`` (artifact names); True if there were any."""
    found = False
    for i, layer in enumerate(model.layers):
        key = f"layers.{i}.predictor"
        if f"{key}.a" not in tensors:
            continue
        if not isinstance(layer.mlp, ReGLUMLP):
            raise ArtifactError(f"layer {i} has no ReGLU FFN to put a predictor on")
        dt = model.dtype
        layer.mlp.predictor = model.ex.prepare_predictor(tensors[f"{key}.a"].to(dt), tensors[f"{key}.b"].to(dt),
                                                         tensors[f"{key}.bias"].to(dt))
        found = True
    return found
