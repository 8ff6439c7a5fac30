"""Greedy importance-weighted thresholds vs the layer-wide quantile baseline."""
import pytest
import torch

from edgesparse.errors import InvalidOptionError
from edgesparse.predictors.thresholds import calibrate_thresholds, quantile_thresholds


def synthetic_layer(n, f, seed, tokens_seed=None):
    g = torch.Generator().manual_seed(seed)
    # Neurons differ in firing rate and importance, as in trained ReGLU layers.
    offset = torch.randn(f, generator=g) * 1.5 - 1.0
    down_norms = torch.rand(f, generator=g) * 3
    if tokens_seed is not None:   # same neurons, fresh tokens
        g = torch.Generator().manual_seed(1000 + tokens_seed)
    gate = torch.randn(n, f, generator=g) + offset
    scores = gate + 0.5 * torch.randn(n, f, generator=g)        # noisy low-rank prediction
    up = torch.randn(n, f, generator=g)
    return scores, gate, up, down_norms


def weighted_miss(bias, scores, gate, up, down_norms):
    skip = scores + bias <= 0
    cost = ((torch.relu(gate) * up).abs() * down_norms).pow(2)
    return (cost * skip).sum().item() / cost.sum().item(), skip.float().mean().item()


def test_greedy_beats_quantile_at_equal_sparsity_on_held_out_tokens():
    cal, test = synthetic_layer(3000, 200, 0, tokens_seed=1), synthetic_layer(3000, 200, 0, tokens_seed=2)
    s, gate_t, up, dn = test
    res = calibrate_thresholds(*cal, target_sparsity=0.6)
    assert abs(res.skip_share - 0.6) < 0.01
    q = quantile_thresholds(cal[0], 0.6)
    miss_greedy, sp_greedy = weighted_miss(res.bias, s, gate_t, up, dn)
    miss_quant, sp_quant = weighted_miss(q, s, gate_t, up, dn)
    assert abs(sp_greedy - sp_quant) < 0.03
    assert miss_greedy < 0.5 * miss_quant, (miss_greedy, miss_quant)


def test_recall_target_is_met_and_no_neuron_is_always_off():
    scores, gate, up, dn = synthetic_layer(2000, 100, 1)
    res = calibrate_thresholds(scores, gate, up, dn, target_recall=0.95)
    assert 0.95 <= res.recall < 0.97
    skip = scores + res.bias <= 0
    assert not skip.all(dim=0).any()
    hi = calibrate_thresholds(scores, gate, up, dn, target_recall=0.995)
    assert hi.skip_share < res.skip_share


def test_bad_targets():
    scores, gate, up, dn = synthetic_layer(10, 5, 2)
    with pytest.raises(InvalidOptionError):
        calibrate_thresholds(scores, gate, up, dn)
    with pytest.raises(InvalidOptionError):
        calibrate_thresholds(scores, gate, up, dn, target_recall=0.9, target_sparsity=0.5)
