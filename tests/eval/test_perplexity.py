"""The paired per-window comparison ``eval ppl`` reports."""
import math

import pytest

from edgesparse.eval.perplexity import paired


def test_paired_difference_interval_and_share():
    a = [10.0, 20.0, 30.0, 40.0]
    b = [9.0, 19.5, 29.0, 39.5]   # B better on every window by 0.5-1 nats over 10 tokens
    r = paired(a, b, tokens_per_window=10)
    assert r["windows"] == 4 and r["b_better_share"] == 1.0
    assert r["nll_diff_per_token"] == pytest.approx(-0.075)
    sd = math.sqrt(sum((x - 0.075) ** 2 for x in (0.1, 0.05, 0.1, 0.05)) / 3)
    assert r["ci95"][1] == pytest.approx(-0.075 + 1.96 * sd / 2, abs=1e-6)
    assert r["significant"]
    noisy = paired(a, [11.0, 19.0, 31.0, 39.0], 10)   # +-1 around A: no difference to speak of
    assert noisy["nll_diff_per_token"] == 0 and not noisy["significant"] and noisy["b_better_share"] == 0.5
    assert not paired([1.0], [0.5], 10)["significant"]   # one window: no interval
