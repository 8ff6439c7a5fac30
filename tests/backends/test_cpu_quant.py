"""The cpu backend's native q8_0 / q4_0 kernels against the de-quantising torch reference:
odd row counts, one-block rows, 0 / 1 / some / all rows selected."""
import pytest
import torch

from edgesparse.backends.cpu import native
from edgesparse.backends.formats import quantize_rows

pytestmark = pytest.mark.skipif(native.lib() is None, reason=f"native kernels unavailable: {native.status()}")
SHAPES = [(1, 32), (37, 96), (130, 256)]


def _q(n, cols, fmt, seed=0):
    return quantize_rows(torch.randn(n, cols, generator=torch.Generator().manual_seed(seed)), fmt)


def _close(got, want, tol):
    scale = max(want.abs().max().item(), 1.0)
    assert (got - want).abs().max().item() <= tol * scale


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("n, d", SHAPES)
def test_gemv(fmt, n, d):
    w = _q(n, d, fmt)
    g = torch.Generator().manual_seed(11)   # own seed: the bound below is for typical inputs, not any
    x, bias = torch.randn(d, generator=g), torch.randn(n, generator=g)
    # the dots round x to int8 blocks: ~1% of the result's scale
    _close(native.q_gemv(w, x, bias), w.rows() @ x + bias, 2e-2)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("tokens", [2, 3, 4, 5, 9])
def test_gemm_is_the_gemv_of_every_token(fmt, n, d, tokens):
    """Prefill's GEMM runs the GEMV's dots over the same row groups: bit for bit the same."""
    w = _q(n, d, fmt, 12)
    g = torch.Generator().manual_seed(13)
    x, bias = torch.randn(tokens, d, generator=g), torch.randn(n, generator=g)
    out = native.q_gemm(w, x, bias)
    assert out.shape == (tokens, n)
    for t in range(tokens):
        assert torch.equal(out[t], native.q_gemv(w, x[t], bias))
    _close(out, x @ w.rows().T + bias, 2e-2)
    assert torch.allclose(native.q_gemm(w, x), out - bias, atol=1e-4)   # no bias: NULL


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_gemm_over_many_row_tiles_and_tokens(fmt):
    """A prompt-sized GEMM: rows in several L2 tiles per thread (GEMM_TILE_BYTES), an odd row
    count (a tail of one-row dots), 4-token passes with remainders.  A decode batch's GEMM
    (``prompt=False``) is the GEMV of every token, bit for bit, at any size.  A prompt's
    (``prompt=True``) takes, from 8 tokens on (q8_0: 32), 16-row tiles of rows repacked in lane
    order (quant_gemm_tiles.h, AVX-512 VNNI): the same exact integer block sums, added over
    blocks in another fp32 order, so equal to the GEMV up to fp32 rounding; each thread's
    last rows (fewer than 16) and 16-token passes with remainders of 3 and 2 are covered.
    Below those counts a prompt's GEMM is bit for bit the GEMV too."""
    n, d = 2 * 131 + 1, 4096 + 64   # q8_0 rows of 4,420 B: tiles of 28 rows
    w = _q(n, d, fmt, 14)
    g = torch.Generator().manual_seed(15)
    for tokens in (7, 8, 15, 16, 35, 66):
        x, bias = torch.randn(tokens, d, generator=g), torch.randn(n, generator=g)
        batch, prompt = native.q_gemm(w, x, bias), native.q_gemm(w, x, bias, prompt=True)
        _close(prompt, x @ w.rows().T + bias, 2e-2)
        for t in range(tokens):
            want = native.q_gemv(w, x[t], bias)
            assert torch.equal(batch[t], want)
            if tokens < (32 if fmt == "q8_0" else 8):
                assert torch.equal(prompt[t], want)
            else:
                assert torch.allclose(prompt[t], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_executor_gives_prompts_the_prompt_gemm_and_decode_batches_the_exact_one():
    """Outside ``ex.prompt()`` (decode steps, batched ones too) every row is its token alone;
    inside (a prefill) the prompt GEMM runs, which takes the repacked tiles from 8 rows."""
    from edgesparse.backends.cpu import CpuExecutor
    from edgesparse.backends.interface import LinearWeights
    ex, w = CpuExecutor("cpu"), _q(48, 256, "q4_0", 21)
    g = torch.Generator().manual_seed(22)
    for rows in (7, 8, 40):
        x = torch.randn(rows, 256, generator=g)
        batch = ex.linear(x, LinearWeights(w))
        assert all(torch.equal(batch[t], native.q_gemv(w, x[t])) for t in range(rows))
        with ex.prompt():
            prompt = ex.linear(x, LinearWeights(w))
        assert torch.equal(prompt, native.q_gemm(w, x, prompt=True))
        if rows < 8:   # below the floor the prompt GEMM is the exact one
            assert torch.equal(prompt, batch)
    assert not ex._in_prompt


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("n, d", SHAPES)
def test_weighted_rows(fmt, n, d):
    w = _q(n, d, fmt, 1)
    g = torch.Generator().manual_seed(2)
    for count in (0, 1, n // 2, n):
        idx = torch.randperm(n, generator=g)[:count]
        coef = torch.randn(count, generator=g)
        want = coef @ w.rows(idx) if count else torch.zeros(d)
        _close(native.q_weighted_rows(w, idx, coef), want, ROW_SUM_TOL[fmt])
    coef = torch.randn(n, generator=g)
    _close(native.q_weighted_rows(w, None, coef), coef @ w.rows(), ROW_SUM_TOL[fmt])


# q8_0 row sums are fp32 all the way (exact up to order); 4-bit ones, on AVX2, round each
# row's coefficient to int8 on a scale shared by 16 rows (quant_axpy.h), as the dots round x.
ROW_SUM_TOL = {"q8_0": 1e-5, "q4_0": 2e-2, "q4_1": 2e-2}


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_one_row_sum_is_exact(fmt):
    """A group of one row: its coefficient is the group's scale, so nothing is rounded."""
    w = _q(5, 2560, fmt, 14)   # 80 blocks: more than one 64-block chunk
    for i, a in ((0, 1.0), (3, -2.5)):
        got = native.q_weighted_rows(w, torch.tensor([i]), torch.tensor([a]))
        _close(got, a * w.rows(torch.tensor([i]))[0], 1e-5)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
@pytest.mark.parametrize("count", [2, 15, 16, 17, 33])
def test_row_sum_groups_round_like_the_dots(fmt, count):
    """Odd groups (a row paired with itself), full groups and groups split over threads:
    the error is the coefficients' int8 rounding, ~0.5% rms like the GEMV's, never a wrong row."""
    g = torch.Generator().manual_seed(count)
    w = _q(40, 2560, fmt, 15)
    idx = torch.randperm(40, generator=g)[:count]
    coef = torch.randn(count, generator=g)
    want = coef @ w.rows(idx)
    err = native.q_weighted_rows(w, idx, coef) - want
    assert err.pow(2).mean().sqrt() <= 0.01 * want.pow(2).mean().sqrt()
    _close(native.q_weighted_rows(w, idx, coef), want, 2e-2)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("n, d", SHAPES + [(45, 2560)])   # one block (a thread without columns); 80 blocks
@pytest.mark.parametrize("tokens", [1, 3])
def test_rows_gemm(fmt, n, d, tokens):
    """Prefill over rows (neuron-major down, Top-K Wᵀ): every token's row sum over all rows."""
    w = _q(n, d, fmt, 16)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(17))
    x[0, : n // 2] = 0   # zeroed coefficients (a batch's masked Top-K) are plain rows of zeros
    out = native.q_rows_gemm(w, x)
    assert out.shape == (tokens, d)
    _close(out, x @ w.rows(), ROW_SUM_TOL[fmt])
    for t in range(tokens):
        _close(out[t], native.q_weighted_rows(w, None, x[t]), ROW_SUM_TOL[fmt])


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_topk_linear(fmt):
    d_in, d_out = 70, 64
    w_t = _q(d_in, d_out, fmt, 3)
    x = torch.randn(d_in, generator=torch.Generator().manual_seed(4))
    for k in (1, 17, d_in - 1):
        idx = x.abs().topk(k).indices
        _close(native.q_topk_linear(w_t, x, k), x[idx] @ w_t.rows(idx), ROW_SUM_TOL[fmt])


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_reglu_ffn_exact_and_predictor(fmt):
    f, d, r = 150, 64, 8
    g = torch.Generator().manual_seed(5)
    gate, up, down_t = (_q(f, d, fmt, s) for s in (6, 7, 8))
    x = torch.randn(d, generator=g)
    gv = gate.rows() @ x
    u = up.rows() @ x
    out, n_cand, n_active = native.q_reglu_ffn(x, gate, up, down_t)
    _close(out, (torch.relu(gv) * u) @ down_t.rows(), 3e-2)
    assert n_cand == f and abs(n_active - int((gv > 0).sum())) <= 3
    a_t, b_t = torch.randn(r, d, generator=g), torch.randn(f, r, generator=g)
    scores = b_t @ (a_t @ x)
    for keep in ("none", "some", "all"):
        margin = {"none": -1e4, "all": 1e4}.get(keep)
        bias = torch.full((f,), margin) if margin else torch.where(torch.arange(f) % 2 == 0, 1.0, -1.0) - scores
        cand = scores + bias > 0
        out, n_cand, n_active = native.q_reglu_ffn(x, gate, up, down_t, a_t, b_t, bias)
        _close(out, (torch.relu(gv) * cand * u) @ down_t.rows(), 3e-2)
        assert n_cand == int(cand.sum())


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("d", [64, 96, 288])   # even and odd block counts (pairs + one block)
def test_four_row_dots_equal_one_row_dots(fmt, d):
    """GEMV rows go four at a time over block pairs (AVX-512 VNNI) with single-row, single-
    block tails; the same integer dots either way, so each row's result must not depend on
    which path it took (a wrong scale lane would show here far above rounding)."""
    n = 11   # 2 threads: groups of four plus tails of one to three rows
    w = _q(n, d, fmt, 9)
    x = torch.randn(d, generator=torch.Generator().manual_seed(10))
    together = native.q_gemv(w, x)
    for i in range(n):
        one = quantize_rows(w.rows(torch.tensor([i])), fmt)   # the same blocks as a one-row matrix
        alone = native.q_gemv(one, x)
        assert torch.allclose(together[i:i + 1], alone, rtol=1e-5, atol=1e-5), (i, together[i], alone)
    _close(together, w.rows() @ x, 2e-2)
