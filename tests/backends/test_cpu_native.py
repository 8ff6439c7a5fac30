"""The native cpu kernels: bf16 and fp32 against the torch path, and every way the build can
be unavailable (the cpu backend must then fall back to torch ops, not fail)."""
import pytest
import torch

from edgesparse.backends.cpu import native
from edgesparse.backends.cpu import CpuExecutor
from edgesparse.backends.interface import topk_indices
from edgesparse.predictors.int8 import snap_factors, snap_rows

needs_native = pytest.mark.skipif(native.lib() is None, reason=f"native kernels: {native.status()}")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """Forget the loaded library and build into an empty cache dir."""
    saved = dict(native._state)
    native._state.clear()
    monkeypatch.setenv("EDGESPARSE_CACHE", str(tmp_path))
    yield tmp_path
    native._state.clear()
    native._state.update(saved)


def close(got, want_fp32, dtype):
    """Native results come back in the weights' dtype: compare with the fp32 reference rounded
    the same way (bf16: one rounding step of slack for a different summation order)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    return got.dtype == dtype and torch.allclose(got.float(), want_fp32.to(dtype).float(), atol=tol, rtol=tol)


def layer(d, f, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(f, d, generator=g) / d**0.5, torch.randn(f, d, generator=g) / d**0.5
    down = torch.randn(d, f, generator=g) / f**0.5
    a, b, bias = torch.randn(d, 16, generator=g), torch.randn(16, f, generator=g) / 4, torch.randn(f, generator=g)
    x = torch.randn(1, d, generator=g)
    return [t.to(dtype) for t in (x, gate, up, down, a, b, bias)]


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("d,f", [(256, 1000), (67, 301)])
def test_fused_ffn_matches_torch_ops(dtype, tol, d, f):
    x, gate, up, down, a, b, bias = layer(d, f, dtype)
    fast = CpuExecutor("cpu")
    torch_ops = super(CpuExecutor, fast)   # the composed torch path on the same weights
    fw = fast.prepare_ffn(gate, up, down, "relu")
    qa, qb = snap_factors(a.float(), b.float())
    # thresholds a clear margin from every score: bf16 rounding of the torch path's scores
    # cannot flip a neuron, so both paths must agree on the set
    margin = torch.where(torch.arange(f) % 2 == 0, 1.0, -1.0)
    on_grid = fast.prepare_predictor(qa.to(dtype), qb.to(dtype), (margin - (x.float() @ qa @ qb)[0]).to(dtype))
    assert on_grid.packed[0].dtype == on_grid.packed[2].dtype == torch.int8      # native reads int8 rows
    assert fast.prepare_predictor(a, b, bias).packed is None                     # off-grid: float rows
    a_off = a.float() + 1e-3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(9))   # like a rotated A
    b_only = fast.prepare_predictor(a_off.to(dtype), qb.to(dtype), (margin - (x.float() @ a_off @ qb)[0]).to(dtype))
    assert b_only.packed[0] is None and b_only.packed[2].dtype == torch.int8
    for p in (None, fast.prepare_predictor(a, b, bias), on_grid, b_only):
        got, n_cand, n_act = fast.reglu_sparse(x, fw, p)
        want, r_cand, r_act = torch_ops.reglu_sparse(x, fw, p)
        assert got.dtype == dtype and got.shape == (1, d)
        err = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert err < tol
        # bf16 scores may round differently right at a threshold: allow a neuron or two
        assert abs(n_cand - r_cand) <= (0 if dtype == torch.float32 else 2)
        assert abs(n_act - r_act) <= (0 if dtype == torch.float32 else 2)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_rows_reads_the_given_rows(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 37, generator=g).to(dtype)
    for n in (0, 1, 150, 300):
        idx = torch.randperm(300, generator=g)[:n]
        coef = torch.randn(n, generator=g).to(dtype)
        assert close(native.weighted_rows(w, idx, coef), coef.float() @ w[idx].float(), dtype)
    coef = torch.randn(300, generator=g).to(dtype)   # no index list: every row, in order
    assert close(native.weighted_rows(w, None, coef), coef.float() @ w.float(), dtype)


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_single_token_linear_and_dense_ffn_match_torch(dtype, tol):
    x, gate, up, down, *_ = layer(200, 333, dtype, seed=2)
    ex = CpuExecutor("cpu")
    bias = torch.randn(333).to(dtype)
    got = ex.linear(x.view(1, 1, -1), ex.prepare_linear(gate, bias))
    want = (x.float() @ gate.float().T + bias.float()).view(1, 1, -1)
    assert got.shape == want.shape and torch.allclose(got.float(), want, atol=tol, rtol=tol)
    fw = ex.prepare_ffn(gate, up, down, "silu")
    want = (torch.nn.functional.silu(x.float() @ gate.float().T) * (x.float() @ up.float().T)) @ down.float().T
    got = ex.ffn_dense(x, fw)
    assert torch.allclose(got.float(), want, atol=5 * tol, rtol=5 * tol)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_linear_selects_in_c_with_the_shared_tie_rule(dtype):
    g = torch.Generator().manual_seed(4)
    for d, k in [(5, 1), (64, 23), (333, 111), (333, 332), (2048, 1229)]:
        w = torch.randn(d, 19, generator=g).to(dtype)
        x = torch.randn(d, generator=g).to(dtype)   # bf16: many exact ties
        idx = topk_indices(x, k)
        assert close(native.topk_linear(w, x, k), x[idx].float() @ w[idx].float(), dtype)
    x = torch.tensor([3.0, -1.0, 1.0, 0.5])   # |x| ties at the 2nd place: the lower index wins
    assert topk_indices(x, 2).tolist() == [0, 1]
    w = torch.randn(4, 3, generator=g).to(dtype)
    assert close(native.topk_linear(w, x.to(dtype), 2), 3 * w[0].float() - w[1].float(), dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_torch_reference(dtype):
    g = torch.Generator().manual_seed(5)
    ex = CpuExecutor("cpu")
    torch_ops = super(CpuExecutor, ex)
    for d in (7, 64, 2048):
        x = (3 * torch.randn(1, 1, d, generator=g)).to(dtype)
        w = torch.randn(d, generator=g).to(dtype)
        got, want = ex.rms_norm(x, w, 1e-5), torch_ops.rms_norm(x, w, 1e-5)
        assert got.shape == want.shape and got.dtype == dtype
        # bf16: the fp32 mean may differ in its last bit (summation order) and flip a rounding
        assert torch.allclose(got.float(), want.float(), atol=0, rtol=1e-6 if dtype == torch.float32 else 8e-3)


def test_disabled_native_falls_back_to_torch(fresh_build, monkeypatch):
    monkeypatch.setenv("EDGESPARSE_NATIVE", "0")
    assert native.lib() is None and "disabled" in native.status()
    assert "disabled" in CpuExecutor.availability()[1]
    x, gate, up, down, *_ = layer(64, 100, torch.float32)
    ex = CpuExecutor("cpu")
    out, _, _ = ex.reglu_sparse(x, ex.prepare_ffn(gate, up, down, "relu"), None)
    want = (torch.relu(x @ gate.T) * (x @ up.T)) @ down.T
    assert torch.allclose(out, want, atol=1e-5)


def test_failed_build_is_reported_not_raised(fresh_build, monkeypatch, tmp_path):
    fake_cc = tmp_path / "cc"
    fake_cc.write_text("#!/bin/sh\necho 'cc: error: no such target' >&2\nexit 1\n")
    fake_cc.chmod(0o755)
    monkeypatch.setenv("CC", str(fake_cc))
    with pytest.warns(RuntimeWarning, match="torch reference ops"):   # loud, never silent
        assert native.lib() is None
    assert native.status().startswith("native build failed: cc: error")


def test_missing_compiler_is_one_warning_not_a_crash(fresh_build, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="cannot run"):
        assert native.lib() is None


def test_the_build_cache_is_keyed_on_cpu_features_not_the_host(fresh_build, monkeypatch):
    """A cache dir copied to another CPU must not load a library built for this one."""
    assert native.lib() is not None
    built = {p.name for p in native.cache_dir().glob("sparse_rows-*.so")}
    native._state.clear()
    monkeypatch.setattr(native, "cpu_features", lambda: "fpu sse2")   # an older CPU
    monkeypatch.setattr(native.platform, "node", lambda: "same-host")
    native.lib()
    assert {p.name for p in native.cache_dir().glob("sparse_rows-*.so")} - built   # a new build


def test_unsupported_weights_use_torch_ops():
    # fp16 weights and non-contiguous views are not served by the native kernels.
    assert not native.supports(torch.zeros(4, 4, dtype=torch.float16))
    assert not native.supports(torch.zeros(4, 6).t())


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_decode_attention_matches_the_torch_path(dtype, tol):
    # The fused C attention rounds RoPE like transformers' bf16 code: the cache it writes is
    # bit-identical to the torch path's; the output differs only by summation order.
    g = torch.Generator().manual_seed(6)
    ex = CpuExecutor("cpu")
    torch_ops = super(CpuExecutor, ex)
    nh, nkv, hd, max_len, slot = 32, 4, 64, 100, 77
    qkv = torch.randn((nh + 2 * nkv) * hd, generator=g).to(dtype)
    theta = torch.randn(hd // 2, generator=g) * 3
    cos, sin = torch.cat([theta.cos()] * 2).to(dtype), torch.cat([theta.sin()] * 2).to(dtype)
    k, v = torch.randn(nkv, max_len, hd, generator=g).to(dtype), torch.randn(nkv, max_len, hd, generator=g).to(dtype)
    k_ref, v_ref = k.clone(), v.clone()
    got = ex.decode_attention(qkv, cos, sin, k, v, slot, 5, nh)
    want = torch_ops.decode_attention(qkv, cos, sin, k_ref, v_ref, slot, 5, nh)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert got.dtype == dtype and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


@needs_native
@pytest.mark.parametrize("rank", [64, 128])
def test_int8_predictor_rows_of_simd_width(rank):
    # rank a multiple of 64: B's short rows take the two-rows-at-a-time path, with an odd
    # number of neurons per thread so the single-row tail runs too
    g = torch.Generator().manual_seed(7)
    d, f = 256, 301
    x = torch.randn(1, d, generator=g)
    gate, up, down = torch.randn(f, d, generator=g) / 16, torch.randn(f, d, generator=g) / 16, torch.randn(d, f, generator=g) / 17
    qa = snap_rows(torch.randn(rank, d, generator=g)).T
    qb = snap_rows(torch.randn(f, rank, generator=g)).T
    bias = torch.where(torch.arange(f) % 3 == 0, 2.0, -2.0) - (x @ qa @ qb)[0]
    ex = CpuExecutor("cpu")
    p, fw = ex.prepare_predictor(qa, qb, bias), ex.prepare_ffn(gate, up, down, "relu")
    assert p.packed[0] is not None and p.packed[2] is not None
    got, n_cand, n_act = ex.reglu_sparse(x, fw, p)
    want, r_cand, r_act = super(CpuExecutor, ex).reglu_sparse(x, fw, p)
    assert (n_cand, n_act) == (r_cand, r_act) == (101, int(((x @ gate.T)[0, ::3] > 0).sum()))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16, "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("fat", [False, True])
def test_fatrelu_threshold_in_the_native_ffn_matches_torch_ops(weights, fat):
    """FATReLU (gate kept where > t) in the native one-token kernels, float and block rows,
    exact and predictor mode, against the executor's composed torch ops on the same weights.
    FATReLU jumps by t at t, so t is put in the widest gap between this token's gate values
    (rounding and 8-bit activations then cannot move a neuron across it)."""
    from edgesparse.backends.formats import dense, quantize_rows
    dtype = weights if isinstance(weights, torch.dtype) else torch.float32
    f = 120
    x, gate, up, down, a, b, bias = layer(96, f, dtype, seed=5)
    fast = CpuExecutor("cpu")
    if isinstance(weights, str):
        fast.weight_format = weights
        gate, up = quantize_rows(gate.float(), weights), quantize_rows(up.float(), weights)
        down = quantize_rows(down.float().T.contiguous(), "q8_0")   # neuron-major, as a ReGLU's is stored
    g = (x.float() @ dense(gate, torch.float32).float().T)[0].sort().values
    window = g[(g > 0.15) & (g < 0.8)]
    gaps = window[1:] - window[:-1]
    threshold = float((window[gaps.argmax()] + window[gaps.argmax() + 1]) / 2) if fat else 0.0
    torch_ops = super(CpuExecutor, fast)
    fw = fast.prepare_ffn(gate, up, down, "fatrelu" if fat else "relu", threshold)
    margin = torch.where(torch.arange(f) % 2 == 0, 1.0, -1.0)   # a clear margin from every score
    pred = fast.prepare_predictor(a, b, (margin - (x.float() @ a.float() @ b.float())[0]).to(dtype))
    tol = 1e-4 if dtype == torch.float32 and not isinstance(weights, str) else 3e-2
    for p in (None, pred):
        got, n_cand, n_act = fast.reglu_sparse(x, fw, p)
        want, want_cand, want_act = torch_ops.reglu_sparse(x, fw, p)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        assert abs(int(n_act) - int(want_act)) <= (0 if fat else 3)   # ReLU: 8-bit x may flip a gate near 0
    if fat:   # the threshold really drops neurons the plain ReLU keeps
        relu = fast.prepare_ffn(gate, up, down, "relu")
        assert int(fast.reglu_sparse(x, relu, None)[2]) > int(fast.reglu_sparse(x, fw, None)[2])
