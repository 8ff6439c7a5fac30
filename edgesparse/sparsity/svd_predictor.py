"""SVD predictors of ReGLU gates: fit (whitened truncated SVD, int8 factors, per-neuron
thresholds) and apply (put the predictors on a loaded model's ReGLUMLP layers).

The math lives in ``predictors/`` (pure fitting, no model); this module binds it to layers."""
from __future__ import annotations

import torch

from edgesparse.errors import ArtifactError
from edgesparse.models.weights import ReGLUMLP
from edgesparse.predictors.cost import FFNShape, rank_grid
from edgesparse.predictors.int8 import snap_factors
from edgesparse.predictors.svd import default_rank, fit_predictor
from edgesparse.predictors.thresholds import calibrate_thresholds
from edgesparse.progress import progress


SEARCH_TOKENS = 2048   # held-out tokens the rank search scores each rank on (all for the pick)
SEARCH_ITERATIONS = 40


def _row_bytes(m) -> float:
    return m.nbytes / m.shape[0]


def fit(model, gram_a: dict, held: dict, rank: int | None, target_sparsity, target_recall, int8: bool = True):
    """Per layer: the SVD of the gate whitened by ``gram_a[tap]`` (the MLP input's Gram over the
    calibration half A), then thresholds fitted on ``held[tap]`` (half B's MLP inputs).

    With ``rank`` None and a recall target, each layer's rank is searched over
    ``cost.rank_grid``: one SVD at the largest rank gives every smaller one (its leading
    factors), thresholds are fitted per rank on a subsample, and the rank whose predictor
    reads the fewest bytes per token (``predictors/cost.py``) is refitted on all held tokens.
    Then (with a recall target) the layer runs that predictor, or exact mode, or the dense FFN,
    whichever the cost model says reads least.  Returns ``(artifact tensors, per-layer report)``."""
    tensors, layers = {}, []
    for i, layer in enumerate(progress(model.layers, desc="fitting predictors")):
        tap, ffn = f"layers.{i}.mlp_in", layer.mlp.ffn
        gate_w = ffn.gate.float().cpu()
        d_ff, d = gate_w.shape
        x = torch.cat(held[tap])
        # the gate as the activation keeps it (FATReLU: > t), so "active" below is gate > t
        gate, up = ffn.act_fn(x @ gate_w.T), x @ ffn.up.float().cpu().T
        down_norms = ffn.down_t.float().cpu().norm(dim=1)
        active = (gate > 0).float().mean().item()
        shape = FFNShape(d, d_ff, _row_bytes(ffn.gate), _row_bytes(ffn.up), _row_bytes(ffn.down_t),
                         1.0 if int8 else model.dtype.itemsize)
        grid = [rank] if rank else ([default_rank(d)] if target_sparsity is not None else rank_grid(d, d_ff))
        a_all, b_all = fit_predictor(gate_w, max(grid), gram_a[tap])

        def factors(r):
            a, b = a_all[:, :r].contiguous(), b_all[:r].contiguous()
            return snap_factors(a, b) if int8 else (a, b)   # thresholds fit the predictor that runs

        def thresholds(a, b, rows=slice(None), iterations=60):
            return calibrate_thresholds(x[rows] @ a @ b, gate[rows], up[rows], down_norms,
                                        target_sparsity=target_sparsity, target_recall=target_recall,
                                        iterations=iterations)
        tried = {}
        if len(grid) > 1:
            sub = torch.linspace(0, x.shape[0] - 1, min(SEARCH_TOKENS, x.shape[0])).long()
            for r in grid:
                res = thresholds(*factors(r), sub, SEARCH_ITERATIONS)
                tried[r] = (shape.predictor(r, 1 - res.skip_share, res.recall * active), round(res.skip_share, 4))
        r = min(tried, key=lambda k: tried[k][0]) if tried else grid[0]
        a, b = factors(r)
        res = thresholds(a, b)
        cost = {"predictor": shape.predictor(r, 1 - res.skip_share, res.recall * active),
                "exact": shape.exact(active), "dense": shape.dense()}
        # A target sparsity asks for the predictor at that sparsity in every layer.
        mode = "predictor" if target_sparsity is not None else min(cost, key=cost.get)
        if mode == "predictor":
            tensors.update({f"layers.{i}.predictor.a": a, f"layers.{i}.predictor.b": b,
                            f"layers.{i}.predictor.bias": res.bias.float()})
        pred = mode == "predictor"
        layers.append(dict(layer=i, mode=mode, rank=r if pred else 0,
                           gate_sparsity=round(res.skip_share, 4) if pred else 0.0,
                           recall=round(res.recall, 4) if pred else 1.0,
                           precision=round(res.precision, 4) if pred else round(active, 4),
                           weighted_recall=round(res.weighted_recall, 5) if pred else 1.0,
                           natural_sparsity=round(1 - active, 4),
                           predictor_bytes=int(shape.predictor_bytes(r)) if pred else 0,
                           bytes={k: int(v) for k, v in cost.items()},
                           ranks_tried={str(k): dict(bytes=int(v[0]), gate_sparsity=v[1]) for k, v in tried.items()}))
    return tensors, layers


def apply(model, tensors: dict, layers: list | None = None) -> bool:
    """Install the predictors found in ``tensors`` (artifact names), and each layer's
    calibrated mode from the manifest's ``layers`` (exact or dense where the predictor did not
    pay; artifacts without modes: predictor); True if there were any predictors."""
    found = False
    modes = {l["layer"]: l.get("mode", "predictor") for l in layers or ()}
    for i, layer in enumerate(model.layers):
        key = f"layers.{i}.predictor"
        mode = modes.get(i, "predictor")
        if f"{key}.a" not in tensors and mode == "predictor":
            continue
        if not isinstance(layer.mlp, ReGLUMLP):
            raise ArtifactError(f"layer {i} has no ReGLU FFN to put a predictor on")
        if mode not in ReGLUMLP.modes:
            raise ArtifactError(f"layer {i} has an unknown calibrated mode {mode!r}")
        layer.mlp.calibrated_mode = mode
        if mode == "predictor":
            dt = model.dtype
            layer.mlp.predictor = model.ex.prepare_predictor(
                tensors[f"{key}.a"].to(dt), tensors[f"{key}.b"].to(dt), tensors[f"{key}.bias"].to(dt))
        found = True
    return found
