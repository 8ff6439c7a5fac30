"""Truncation-aware SVD: lower held-out error than plain SVD at equal rank."""
import torch

from edgesparse.predictors.svd import fit_predictor, truncated_svd, whitening_factor


def correlated_inputs(n, d, seed):
    # Anisotropic inputs with a few large directions, like post-norm hidden states: one
    # fixed distribution (mixing matrix, mean), fresh samples per seed.
    g0 = torch.Generator().manual_seed(1234)
    mix = torch.randn(d, d, generator=g0) * torch.logspace(0, -2, d)[None]
    mean = 0.3 * torch.randn(d, generator=g0)
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix.T + mean


def test_whitened_beats_plain_svd_on_held_out_activations():
    d, f, r = 64, 256, 8
    w = torch.randn(f, d, generator=torch.Generator().manual_seed(1)) / d**0.5
    x_fit, x_test = correlated_inputs(4000, d, 2), correlated_inputs(2000, d, 3)
    gram = x_fit.double().T @ x_fit.double()
    errs = {}
    for name, g in (("plain", None), ("whitened", gram)):
        a, b = fit_predictor(w, r, g)
        errs[name] = ((x_test @ a @ b - x_test @ w.T).norm() / (x_test @ w.T).norm()).item()
    assert errs["whitened"] < 0.8 * errs["plain"], errs


def test_full_rank_whitened_predictor_is_exact():
    d, f = 16, 40
    w = torch.randn(f, d)
    x = correlated_inputs(500, d, 0)
    a, b = fit_predictor(w, d, x.double().T @ x.double())
    assert torch.allclose(x @ a @ b, x @ w.T, atol=1e-3)


def test_whitening_never_fails_on_singular_gram():
    x = torch.randn(3, 10).double()            # rank 3 of 10
    s = whitening_factor(x.T @ x)
    assert torch.isfinite(s).all() and s.shape == (10, 10)
    s0 = whitening_factor(torch.zeros(6, 6))   # no signal at all
    assert torch.isfinite(s0).all()


def test_randomized_svd_matches_exact_top_singular_values(monkeypatch):
    import edgesparse.predictors.svd as svd
    m = torch.randn(120, 300, dtype=torch.float64)
    exact = torch.linalg.svdvals(m)[:10]
    monkeypatch.setattr(svd, "EXACT_SVD_MAX", 0)
    _, s, _ = truncated_svd(m, 10)
    assert torch.allclose(s, exact, rtol=0.05)
