"""Per-neuron thresholds for predictor scores, calibrated on held-out tokens.

Skipping neuron i on a token where it was truly active costs its lost contribution to the
FFN output, ``(|h_i| · ||W_down[:, i]||)²`` with ``h_i = relu(g_i) · u_i``.  Per neuron, sort
the calibration tokens by predicted score: raising the threshold past the k lowest scores
skips k tokens at the cumulative cost ``C_i(k)``.  The greedy search repeatedly takes the
step with the least cost per skipped token across all neurons; its fixed point is the
Lagrangian solution ``k_i = argmax_k (λ·k - C_i(k))``, which we compute directly for a given
price λ and bisect λ until the layer reaches its target (skip share or recall).  A neuron
is never switched off for every token (k_i < N)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgesparse.errors import InvalidOptionError


@dataclass
class ThresholdResult:
    bias: torch.Tensor      # [d_ff]: -threshold, so "score + bias > 0" means predicted active
    skip_share: float       # predicted-inactive share on the calibration tokens (gate sparsity)
    recall: float           # share of truly active (token, neuron) pairs predicted active
    precision: float        # share of predicted-active pairs that were truly active
    weighted_recall: float  # share of the importance mass kept


def _metrics(skip: torch.Tensor, active: torch.Tensor, cost: torch.Tensor) -> tuple[float, float, float, float]:
    pred = ~skip
    tp = (pred & active).sum().item()
    return (skip.float().mean().item(), tp / max(active.sum().item(), 1), tp / max(pred.sum().item(), 1),
            1 - (cost * (skip & active)).sum().item() / max(cost.sum().item(), 1e-30))


def _thresholds_from_counts(sorted_scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Threshold between the k-th and (k+1)-th lowest score of each neuron (k=0: below all)."""
    n = sorted_scores.shape[0]
    lo = sorted_scores.gather(0, (k - 1).clamp(min=0)[None])[0]
    hi = sorted_scores.gather(0, k.clamp(max=n - 1)[None])[0]
    span = (sorted_scores[-1] - sorted_scores[0]).abs() + 1e-6
    return torch.where(k == 0, sorted_scores[0] - span, (lo + hi) / 2)


def calibrate_thresholds(scores: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                         down_norms: torch.Tensor, target_sparsity: float | None = None,
                         target_recall: float | None = None, iterations: int = 60) -> ThresholdResult:
    """Greedy importance-weighted per-neuron thresholds.

    ``scores``, ``gate``, ``up``: ``[N, d_ff]`` on held-out tokens (predictor score without
    bias, true gate pre-activation, up projection); ``down_norms``: ``||W_down[:, i]||``;
    ``iterations``: bisection steps of the price (each halves its ~160-nat log-range)."""
    if (target_sparsity is None) == (target_recall is None):
        raise InvalidOptionError("give exactly one of target_sparsity and target_recall")
    n, f = scores.shape
    if n < 2:
        raise InvalidOptionError("threshold calibration needs at least 2 held-out tokens")
    active = gate > 0
    cost = ((torch.relu(gate) * up).abs() * down_norms).pow(2)
    order = scores.argsort(dim=0)
    s_sorted = scores.gather(0, order)
    cum_cost = torch.cat([torch.zeros(1, f), cost.gather(0, order).cumsum(0)])      # C_i(k), k=0..n
    cum_act = torch.cat([torch.zeros(1, f), active.gather(0, order).float().cumsum(0)])
    ks = torch.arange(n + 1, dtype=torch.float32)[:, None]
    total_active = max(active.sum().item(), 1)

    def counts(lam: float) -> torch.Tensor:
        # k_i(λ) = argmax_k λk - C_i(k), k < n; ties go to the smaller k (fewer skips).
        obj = lam * ks[:n] - cum_cost[:n]
        return obj.argmax(dim=0)

    def reached(k: torch.Tensor) -> bool:
        if target_sparsity is not None:
            return k.sum().item() / (n * f) >= target_sparsity
        missed = cum_act.gather(0, k[None])[0].sum().item()
        return 1 - missed / total_active < target_recall   # recall fell below target: too far

    # Bisect the price per skipped token (log scale).  For a recall target we want the
    # largest λ that still keeps recall >= target; for a sparsity target the smallest λ
    # that reaches it.
    lo, hi = 1e-30, max(cum_cost[-1].max().item(), 1e-20) * 10
    for _ in range(iterations):
        mid = (lo * hi) ** 0.5
        if reached(counts(mid)):
            hi = mid
        else:
            lo = mid
    k = counts(hi if target_sparsity is not None else lo)
    thr = _thresholds_from_counts(s_sorted, k)
    skip = scores <= thr
    return ThresholdResult(-thr, *_metrics(skip, active, cost))


def quantile_thresholds(scores: torch.Tensor, target_sparsity: float) -> torch.Tensor:
    """Baseline: one layer-wide threshold at the target quantile of all scores (as a bias)."""
    t = torch.quantile(scores.flatten()[:2**24].float(), target_sparsity)
    return torch.full((scores.shape[1],), -t.item())
