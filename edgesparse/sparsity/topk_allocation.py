"""Per-layer Top-K sizes from measured block errors (``calibrate --topk-allocation measured``).

The uniform split gives every attention block and every SwiGLU MLP the same sparsity.  Layers
differ in how much a per-token Top-K of their input hurts, so this allocation measures it:

1. ``sample_blocks``: a dense pass over a few calibration windows keeps, per layer, the
   residual stream entering the attention and the MLP block (the RMSNorm inputs).
2. ``block_error_curves`` (the shape): per block and per sparsity level on a grid, the
   block's output recomputed with the real Top-K arithmetic of the installed model (rotated
   input Top-K at the rotated site's K, magnitude Top-K of o's / down's input at the
   unrotated site's K, both from ``larosa._block_ks``; attention with RoPE over whole
   windows), its error relative to the dense output.
3. ``final_hidden_errors`` (the scale): per block, the error of the model's final normed
   hidden state when only that block is sparse, at its target.  Block-local errors alone
   lost to uniform (docs/accuracy.md): they miss how much the later layers amplify an error.
4. ``greedy_levels``: TEAL-style greedy.  Every block starts at its lower bound; the block
   whose next ``step`` of sparsity adds the least error per weight it stops reading takes
   it, until the parameter-weighted sparsity of all Top-K linears equals the requested one
   exactly (the last step is cut to fit).

The older ``greedy`` allocation (``larosa.allocate_topk``) ranked blocks by an estimate
(energy of the lowest-variance rotated coordinates) and lost to uniform.  Here every error is
measured on Top-K outputs, with dense inputs to the sparse block (errors of several sparse
blocks are taken to add); ``eval ppl --compare`` is the end-to-end check."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgesparse.backends.interface import rope
from edgesparse.errors import InvalidOptionError
from edgesparse.models.taps import tap_names
from . import larosa

DEFAULT_SAMPLE_TOKENS = 1024
DEFAULT_STEP = 0.05
DEFAULT_FINAL_TOKENS = 512   # tokens carried to the final hidden state, per block (the scale)
DEFAULT_SPREAD = 0.1    # bounds per block: the asked sparsity ± spread (see docs/accuracy.md)
# Highest block sparsity: above ~0.77 a SwiGLU block's unrotated site (1.2x its share) would hit
# block_topk_sizes' 0.99 cap and the block would read more than its level says.
MAX_LEVEL = 0.75


class _InputTap:
    """Executor proxy that keeps the input of every tapped RMSNorm (the residual stream
    entering a block); ``taps.observe`` reports the norm's output, which has lost the
    stream's scale."""

    def __init__(self, ex, names, store):
        self._ex, self._names, self._store = ex, names, store

    def __getattr__(self, name):
        return getattr(self._ex, name)

    def decode_layer(self, *args):
        return None

    def rms_norm(self, x, weight, eps):
        name = self._names.get(id(weight))
        if name is not None:
            self._store.setdefault(name, []).append(x.float().cpu())
        return self._ex.rms_norm(x, weight, eps)


def sample_blocks(model, windows: torch.Tensor, tokens: int = DEFAULT_SAMPLE_TOKENS) -> dict:
    """``{tap: [W, T, d] float32}``: the residual stream entering each block over ``W``
    windows spread evenly through ``windows`` (about ``tokens`` tokens in all)."""
    n = max(1, min(len(windows), round(tokens / windows.shape[1])))
    pick = torch.linspace(0, len(windows) - 1, n).round().long().unique()
    store: dict = {}
    real = model.ex
    model.ex = _InputTap(real, tap_names(model), store)
    try:
        with torch.inference_mode(), model.modes(ffn="dense", attn="dense"):
            for j in pick.tolist():
                chunk = windows[j:j + 1].to(real.device)
                cache = model.new_cache(1, chunk.shape[1])
                pos = torch.arange(chunk.shape[1], device=chunk.device)[None]
                model.forward(chunk, cache, pos)
    finally:
        model.ex = real
    return {k: torch.cat(v) for k, v in store.items()}


def _keep_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` with all but the ``k`` largest-magnitude entries of each row set to zero."""
    if k >= x.shape[-1]:
        return x
    idx = x.abs().topk(k, dim=-1).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def _site_input(x, norm, q, eps):
    """The Top-K'd input of a block's first linear and that linear's weight transform: under
    rotation ``x̂·Q`` against ``W·diag(γ)·Q`` (the norm's weight folded, as ``install_topk``
    does), else ``x̂·γ`` against ``W`` (magnitude Top-K ranks the norm's output)."""
    xh = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    g = norm.float().cpu()
    if q is None:
        return xh * g, lambda w: w
    qf = q.float()
    return xh @ qf, lambda w: (w * g) @ qf


def _attention(spec, qkv, cos, sin):
    """Causal GQA attention of one batch of whole windows ``qkv [W, T, nq + 2 nkv]`` (the
    calibration windows are shorter than any sliding window, so none is applied)."""
    W, T, _ = qkv.shape
    hd, nq, nkv = spec.head_dim, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    q = qkv[..., :nq].view(W, T, spec.n_heads, hd).transpose(1, 2)
    k = qkv[..., nq:nq + nkv].view(W, T, spec.n_kv_heads, hd).transpose(1, 2)
    v = qkv[..., nq + nkv:].view(W, T, spec.n_kv_heads, hd).transpose(1, 2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    if spec.n_kv_heads != spec.n_heads:
        rep = spec.n_heads // spec.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(W, T, nq)


def _bias(b):
    return 0 if b is None else b.float().cpu()


def block_runner(model, li: int, site: str, x: torch.Tensor, q: torch.Tensor | None, mats: dict | None = None):
    """``run(k_rotated, k_unrotated)``: block ``site`` of layer ``li`` on the residual stream
    ``x [W, T, d]`` entering it (whole windows from position 0), with Top-K at those sizes;
    the output is in the unrotated residual basis (a rotation leaves error norms as they are)."""
    spec, layer = model.spec, model.layers[li]
    mats = mats or {k: v.float().cpu() for k, v in larosa._float_layer(model, li, layer).items()}
    norm = layer.attn.norm if site == "attn" else layer.mlp.norm
    xr, fold = _site_input(x, norm, q, spec.eps)
    if site == "attn":
        T = x.shape[1]
        cos, sin = model.cos[:T].float().cpu(), model.sin[:T].float().cpu()
        wqkv, b = fold(mats["qkv"]), _bias(layer.attn.qkv.bias)
        wo, bo = mats["o"], _bias(layer.attn.o.bias)

        def run(kr, ku):
            att = _attention(spec, _keep_topk(xr, kr) @ wqkv.T + b, cos, sin)
            return _keep_topk(att, ku) @ wo.T + bo
        return run
    wgu, down_t, ff = fold(torch.cat([mats["gate"], mats["up"]])), mats["down_t"], spec.intermediate
    act = F.relu if spec.is_reglu else F.silu

    def run(kr, ku):
        gu = _keep_topk(xr, kr) @ wgu.T
        return _keep_topk(act(gu[..., :ff]) * gu[..., ff:], ku) @ down_t
    return run


def block_error_curves(model, samples: dict, rot: dict | None, levels: list[float],
                       sites=("attn", "mlp"), relative_to: str = "output", span=(0.0, 1.0)) -> dict:
    """``{(layer, site): tensor[len(levels)]}``: each block's measured output error at each
    block sparsity in ``levels`` (``rot``: the fitted rotation tensors, None for magnitude),
    relative to its dense output (``relative_to="residual"``: to the residual stream
    entering it, which SmolLM2's few huge residual entries make tiny from layer 12 on, so a
    greedy on it piles the sparsity there and loses).  Only levels within one grid step of ``span`` are
    measured (the greedy never leaves its bounds); the others are NaN."""
    step = levels[1] - levels[0]
    want = [span[0] - step - 1e-9 <= s <= span[1] + step + 1e-9 for s in levels]
    spec, out = model.spec, {}
    with torch.inference_mode():
        for i, layer in enumerate(model.layers):
            mats = {k: v.float().cpu() for k, v in larosa._float_layer(model, i, layer).items()}
            for site in sites:
                x = samples[f"layers.{i}.{site}_in"]
                q = None if rot is None else rot[f"layers.{i}.rotation.{site}"]
                run = block_runner(model, i, site, x, q, mats)
                dense = run(x.shape[-1] * 64, x.shape[-1] * 64)   # K beyond every width: dense
                denom = (dense if relative_to == "output" else x).pow(2).sum().clamp(min=1e-30).item()
                out[(i, site)] = torch.tensor(
                    [(run(*larosa._block_ks(spec, site, s)) - dense).pow(2).sum().item() / denom
                     if w else float("nan") for s, w in zip(levels, want)], dtype=torch.float64)
    return out


def final_hidden_errors(model, samples: dict, rot: dict | None, targets: dict, tokens: int) -> dict:
    """``{(layer, site): e}``: the relative error of the model's final normed hidden state
    when only that block runs Top-K at its site's target sparsity (``targets[site]``) and
    every other block is dense, over about ``tokens`` sampled tokens.  A block's own output
    error says nothing of how much the layers after it amplify or absorb it (SmolLM2: the
    first MLP's relative error is among the smallest, its effect on the output the largest).
    Every block's perturbed stream is carried through the later layers at once, a layer's
    weights read once for all of them."""
    spec = model.spec
    first = samples["layers.0.attn_in"]
    n_win = max(1, min(len(first), round(tokens / first.shape[1])))
    big = spec.hidden + 2 * spec.intermediate + spec.n_heads * spec.head_dim   # K beyond every width
    owners, pert, x = [], None, None
    with torch.inference_mode():
        for i, layer in enumerate(model.layers):
            mats = {k: v.float().cpu() for k, v in larosa._float_layer(model, i, layer).items()}
            for site in ("attn", "mlp"):
                x = samples[f"layers.{i}.{site}_in"][:n_win]
                if pert is not None:   # the streams perturbed earlier go through this block densely
                    flat = pert.flatten(0, 1)
                    pert = (flat + block_runner(model, i, site, flat, None, mats)(big, big)).view(pert.shape)
                if site in targets:
                    q = None if rot is None else rot[f"layers.{i}.rotation.{site}"]
                    y = x + block_runner(model, i, site, x, q, mats)(*larosa._block_ks(spec, site, targets[site]))
                    pert = y[None] if pert is None else torch.cat([pert, y[None]])
                    owners.append((i, site))
            if i == spec.n_layers - 1:
                x = x + block_runner(model, i, "mlp", x, None, mats)(big, big)
    g = model.norm.float().cpu()

    def normed(h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + spec.eps) * g
    ref = normed(x)
    err = (normed(pert) - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp(min=1e-30)
    return {b: err[j].mean().item() for j, b in enumerate(owners)}


def block_params(spec, site: str) -> int:
    """Weights of a block's Top-K linears (rotated and unrotated site)."""
    nq, nkv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    if site == "attn":
        return spec.hidden * (nq + 2 * nkv) + nq * spec.hidden
    return spec.hidden * 2 * spec.intermediate + spec.intermediate * spec.hidden


def greedy_levels(curves: dict, params: dict, targets: dict, levels: list[float],
                  spread: float = DEFAULT_SPREAD, max_level: float = MAX_LEVEL) -> dict:
    """Per block a sparsity in ``[target - spread, target + spread] ∩ [0, max_level]`` (its
    site's target), with ``Σ params·level == Σ params·target`` exactly.

    ``curves[b]``: errors at ``levels`` (an even grid from 0); ``params[b]``: its weights;
    ``targets[b]``: the sparsity asked for its site.  Greedy on measured error per weight
    dropped; errors between grid points are interpolated linearly (only the last, cut step
    lands between them).  Ties go to the lower (layer, site), so the result is deterministic."""
    step = levels[1] - levels[0]

    def err(b, s):
        return _interp(curves[b], levels, s)

    lo = {b: max(0.0, targets[b] - spread) for b in curves}
    hi = {b: min(max_level, targets[b] + spread, levels[-1]) for b in curves}
    if any(lo[b] > targets[b] or hi[b] < targets[b] for b in curves):
        raise InvalidOptionError(f"Top-K sparsity must be at most {min(max_level, levels[-1])} per block "
                                 "for the measured allocation")
    cur = dict(lo)
    left = sum(params[b] * (targets[b] - lo[b]) for b in curves)   # weights still to drop
    order = sorted(curves)
    while left > 1e-6 * max(params.values()):
        best, best_cost = None, None
        for b in order:
            nxt = min(hi[b], (round(cur[b] / step, 6) // 1 + 1) * step)   # next grid point (or the bound)
            if nxt <= cur[b] + 1e-12:
                continue
            cost = (err(b, nxt) - err(b, cur[b])) / (params[b] * (nxt - cur[b]))
            if best_cost is None or cost < best_cost - 1e-15:
                best, best_cost, best_nxt = b, cost, nxt
        if best is None:
            break   # cannot happen: every block's bounds contain its target
        gain = params[best] * (best_nxt - cur[best])
        if gain >= left:
            cur[best] += left / params[best]
            left = 0.0
        else:
            cur[best] = best_nxt
            left -= gain
    return cur


def allocate(model, windows: torch.Tensor, rot: dict | None, attn_sparsity, mlp_sparsity,
             sample_tokens: int = DEFAULT_SAMPLE_TOKENS, spread: float = DEFAULT_SPREAD,
             step: float = DEFAULT_STEP, final_tokens: int = DEFAULT_FINAL_TOKENS) -> tuple[list[dict], dict]:
    """Per-layer Top-K sizes (``install_topk``'s list form, each with its blocks' sparsities)
    and a summary (the predicted final-hidden error sums of this and the uniform allocation,
    the model-level sparsity of the K's), for the asked attention / MLP sparsities.

    Each block's error curve is its own output error over the sparsity grid (the shape),
    scaled so that at the block's target it equals the final-hidden error the block causes
    there (``final_hidden_errors``): the shape costs one block pass per level, the scale one
    pass through the rest of the model per block, at one level only."""
    spec = model.spec
    if not 0 < spread <= 1:
        raise InvalidOptionError(f"allocation spread must be in (0, 1], got {spread}")
    targets = {"attn": attn_sparsity or 0.0}
    if not spec.is_reglu and mlp_sparsity:
        targets["mlp"] = mlp_sparsity
    sites = tuple(s for s, t in targets.items() if t)
    if any(targets[s] > MAX_LEVEL for s in sites):   # before the sampling pass, not after it
        raise InvalidOptionError(f"Top-K sparsity must be at most {MAX_LEVEL} per block for the measured allocation")
    levels = [round(j * step, 6) for j in range(int(round(MAX_LEVEL / step)) + 1)]
    samples = sample_blocks(model, windows, sample_tokens)
    span = (min(targets[s] for s in sites) - spread, max(targets[s] for s in sites) + spread)
    local = block_error_curves(model, samples, rot, levels, sites, span=span)
    tgt = {b: targets[b[1]] for b in local}
    final = final_hidden_errors(model, samples, rot, {s: targets[s] for s in sites}, final_tokens)
    curves = {b: c * (final[b] / max(_interp(c, levels, tgt[b]), 1e-12)) for b, c in local.items()}
    params = {b: block_params(spec, b[1]) for b in curves}
    lv = greedy_levels(curves, params, tgt, levels, spread)
    uniform = larosa.topk_sizes(spec, attn_sparsity, mlp_sparsity)
    out = []
    for i in range(spec.n_layers):
        ks = dict(uniform)
        for site in sites:
            keys = ("qkv", "o") if site == "attn" else ("mlp", "down")
            ks.update(zip(keys, larosa._block_ks(spec, site, lv[(i, site)])))
            ks[f"{site}_sparsity"] = round(lv[(i, site)], 6)
        out.append(ks)

    def err_at(levels_of):
        return sum(_interp(curves[b], levels, levels_of[b]) for b in curves)
    summary = dict(error_measured=round(err_at(lv), 6), error_uniform=round(err_at(tgt), 6),
                   sample_tokens=int(next(iter(samples.values())).shape[:2].numel()), final_tokens=final_tokens,
                   spread=spread, step=step, sparsity=round(k_sparsity(spec, out, sites), 6))
    return out, summary


def _interp(curve, levels, s):
    """``curve`` (errors on the even grid ``levels``) at ``s``, linearly interpolated."""
    step = levels[1] - levels[0]
    j = min(int(s / step + 1e-9), len(levels) - 2)
    t = (s - levels[j]) / step
    if t < 1e-12:   # on the grid: the next point may lie outside the measured span
        return curve[j].item()
    return (1 - t) * curve[j].item() + t * curve[j + 1].item()


def k_sparsity(spec, ks: list[dict], sites=("attn", "mlp")) -> float:
    """Parameter-weighted share of Top-K weights not read under the per-layer K's ``ks``."""
    nq, nkv, d, ff = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.hidden, spec.intermediate
    shapes = {"qkv": (d, nq + 2 * nkv), "o": (nq, d), "mlp": (d, 2 * ff), "down": (ff, d)}
    keys = [k for s in sites for k in (("qkv", "o") if s == "attn" else ("mlp", "down"))]
    total = sum(shapes[k][0] * shapes[k][1] for k in keys) * len(ks)
    kept = sum(layer[k] * shapes[k][1] for layer in ks for k in keys)
    return 1 - kept / total
