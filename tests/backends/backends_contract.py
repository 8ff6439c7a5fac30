"""The executor contract, shared by every backend: each operation against plain-torch math."""
import torch
import torch.nn.functional as F

from edgesparse.backends.formats import quantizable, quantize_rows


def reference_ffn(x, gate, up, down, act, idx=None):
    g = x @ gate.T
    g = torch.relu(g) if act == "relu" else F.silu(g)
    h = g * (x @ up.T)
    if idx is not None:
        keep = torch.zeros(gate.shape[0], dtype=torch.bool)
        keep[idx.cpu()] = True
        h = h * keep.to(h.device)
    return h @ down.T


def reference_topk(x, w, b, k):
    idx = x.abs().topk(k, dim=-1).indices
    xs = torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
    out = xs @ w.T
    return out if b is None else out + b


def check_contract(ex, tol=1e-4, dtype=torch.float32, fmt=None):
    """Run every executor operation on odd shapes and active sets of size 0, 1, some, all.

    ``fmt`` (q8_0 / q4_0): the executor quantises its weights; the references then use the
    same matrices snapped onto that format's grid along the rows the executor stores (shapes
    whose rows are not whole blocks stay float, which is tested too)."""
    gen = torch.Generator().manual_seed(0)
    dev = ex.device
    ex.weight_format = fmt

    def snap(m):   # m's rows onto the format's grid (quantising them again is exact)
        return quantize_rows(m, fmt).rows(dtype=m.dtype) if quantizable(m, fmt) else m

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(dtype)

    def close(a, b, what):
        assert a.shape == b.shape, (what, a.shape, b.shape)
        err = (a.float().cpu() - b.float().cpu()).abs().max().item() if a.numel() else 0.0
        scale = max(b.float().abs().max().item(), 1.0) if b.numel() else 1.0
        assert err <= tol * scale, f"{ex.name}: {what}: max error {err:.3g}"

    for d, dff, batch in [(33, 71, 1), (64, 128, 1), (17, 50, 3), (48, 96, 8), (96, 64, 3)]:
        x = rnd(batch, d)
        w, b = snap(rnd(dff, d) / d**0.5), rnd(dff)
        lw = ex.prepare_linear(w, b)
        close(ex.linear(x.to(dev), lw), x @ w.T + b, "linear")
        gate, up, down = snap(rnd(dff, d) / d**0.5), snap(rnd(dff, d) / d**0.5), snap(rnd(dff, d) / dff**0.5).T
        for act in ("relu", "silu"):
            # a SwiGLU FFN keeps W_down row-major where the executor reads it so (TransposedRows):
            # its reference is W_down snapped along those rows
            dn = snap(down.contiguous()) if act == "silu" and ex.dense_down_rows else down
            fw = ex.prepare_ffn(gate, up, dn, act)
            close(ex.ffn_dense(x.to(dev), fw), reference_ffn(x, gate, up, dn, act), f"ffn_dense {act}")
            for n in (0, 1, dff // 3, dff):
                idx = torch.randperm(dff, generator=gen)[:n].sort().values
                out = ex.ffn_active(x.to(dev), fw, idx.to(dev))
                close(out, reference_ffn(x, gate, up, dn, act, idx), f"ffn_active n={n} {act}")
                g = ex.gate_rows(x.to(dev), fw, idx.to(dev))
                close(g, (x @ gate.T)[:, idx], f"gate_rows n={n}")
        wt = snap(w.T.contiguous()).T     # Top-K stores Wᵀ: its rows are W's columns
        for k in (1, d // 2, d - 1, d):
            tw = ex.prepare_topk(wt, b, k)
            close(ex.topk_linear(x.to(dev), tw), reference_topk(x, wt, b, k), f"topk_linear k={k}")
        for r in (1, 7):
            a_, b_, bias = rnd(d, r), rnd(r, dff), rnd(dff)
            pw = ex.prepare_predictor(a_, b_, bias)
            close(ex.lowrank_scores(x.to(dev), pw), x @ a_ @ b_ + bias, f"lowrank_scores r={r}")
        check_reglu_sparse(ex, x, gate, up, down, rnd, close, exact_counts=fmt is None)
        nw = rnd(d)
        for xs in (x, x[:1].view(1, 1, d)):   # batch rows, and one token (native on cpu)
            xf = xs.float()
            ref = nw * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))
            close(ex.rms_norm(xs.to(dev), nw.to(dev), 1e-5), ref, f"rms_norm {tuple(xs.shape)}")
        for share in (0.0, 1 / dff, 0.5, 1.0):
            mask = torch.rand(batch, dff, generator=gen) < share
            if share == 1 / dff:
                mask = torch.zeros(batch, dff, dtype=torch.bool)
                mask[0, dff // 2] = True
            cols = ex.nonzero_columns(mask.to(dev)).cpu()
            assert torch.equal(cols, mask.any(0).nonzero().flatten()), f"{ex.name}: nonzero_columns"
    check_decode_attention(ex, rnd, close)


def reference_decode_attention(qkv, cos, sin, cache_k, cache_v, slot, first, n_heads):
    """RoPE, cache write and softmax attention spelled out; returns (out, new_k, new_v)."""
    n_kv, _, hd = cache_k.shape
    nq, nkv, half = n_heads * hd, n_kv * hd, hd // 2
    rot = lambda t: t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin   # noqa: E731
    q = rot(qkv[:nq].view(n_heads, hd))
    k, v = cache_k.clone(), cache_v.clone()
    k[:, slot], v[:, slot] = rot(qkv[nq:nq + nkv].view(n_kv, hd)), qkv[nq + nkv:].view(n_kv, hd)
    group = n_heads // n_kv
    kh, vh = (t.repeat_interleave(group, 0)[:, first:slot + 1] for t in (k, v))
    p = torch.softmax((q[:, None, :] * kh).sum(-1) / hd**0.5, dim=-1)
    return (p[..., None] * vh).sum(1).reshape(nq), k, v


def check_decode_attention(ex, rnd, close):
    """One-token attention: GQA and plain heads, first slot, a later slot, a window."""
    dev = ex.device
    for n_heads, n_kv, hd, max_len, slot, first in [(4, 2, 8, 10, 0, 0), (6, 3, 16, 12, 7, 0),
                                                     (4, 4, 8, 9, 8, 3), (8, 1, 64, 40, 39, 0)]:
        qkv = rnd((n_heads + 2 * n_kv) * hd)
        theta = rnd(hd // 2) * 3
        cos, sin = torch.cat([theta.cos()] * 2).to(qkv.dtype), torch.cat([theta.sin()] * 2).to(qkv.dtype)
        cache_k, cache_v = rnd(n_kv, max_len, hd), rnd(n_kv, max_len, hd)
        want, want_k, want_v = reference_decode_attention(qkv, cos, sin, cache_k, cache_v, slot, first, n_heads)
        k_dev, v_dev = cache_k.to(dev), cache_v.to(dev)
        out = ex.decode_attention(qkv.to(dev), cos.to(dev), sin.to(dev), k_dev, v_dev, slot, first, n_heads)
        what = f"decode_attention heads={n_heads}/{n_kv} slot={slot} first={first}"
        close(out, want, what)
        close(k_dev, want_k, what + " cache k")
        close(v_dev, want_v, what + " cache v")


def check_reglu_sparse(ex, x, gate, up, down, rnd, close, exact_counts=True):
    """The fused ReGLU op in exact mode and with predictors admitting no, some and all neurons
    (the native cpu kernels serve batch 1, the composed default larger batches)."""
    dev, (dff, d) = ex.device, gate.shape
    fw = ex.prepare_ffn(gate, up, down, "relu")
    g = x.float() @ gate.float().T
    out, n_cand, n_active = ex.reglu_sparse(x.to(dev), fw, None)
    close(out, reference_ffn(x, gate, up, down, "relu"), "reglu_sparse exact")
    # Quantised kernels round the activation to int8 for dots: gates within that rounding of 0
    # may flip, so their active counts are checked to within a few neurons.
    slack = 0 if exact_counts else max(2, dff // 20)

    def rows_read(mask):   # per token: the union if the op gathers once, the mean if per token
        return int(mask.any(0).sum()), mask.sum(1).float().mean().item()

    def counted(n, mask):
        return min(abs(n - want) for want in rows_read(mask)) <= slack
    assert n_cand == dff and counted(n_active, g > 0), f"{ex.name}: exact counts"
    a_, b_ = rnd(d, 5), rnd(5, dff)
    scores = x.float() @ a_.float() @ b_.float()
    for shift in (-1e4, 0.0, 1e4):   # no / some / all candidates
        # Half the neurons clear row 0's threshold by a margin, so rounding cannot flip them.
        margin = torch.where(torch.arange(dff) % 2 == 0, 0.5, -0.5)
        bias = (margin - scores[0]) if shift == 0.0 else torch.full((dff,), shift)
        bias = bias.to(x.dtype)
        pw = ex.prepare_predictor(a_, b_, bias)
        cand = (scores + bias.float()) > 0
        out, n_cand, n_active = ex.reglu_sparse(x.to(dev), fw, pw)
        h = torch.relu(g) * cand
        ref = (h * (x.float() @ up.float().T)) @ down.float().T
        close(out, ref.to(x.dtype), f"reglu_sparse predictor shift={shift}")
        assert n_cand in rows_read(cand), f"{ex.name}: candidates {n_cand}"
        assert counted(n_active, (g > 0) & cand), f"{ex.name}: active {n_active}"
