"""LaRoSA / Top-K: fit (layerwise rotations, Top-K sizes) and apply (fold the rotations into
the weights and install Top-K projections on a loaded model).

With rotation, each site (attention input, MLP input) of layer l has an orthogonal Q.  Its
RMSNorm weight is folded into the linears that read it, so the norm commutes with Q; Q is
folded into those linears (``W -> W·diag(γ)·Q``); the output projections write straight into
the rotated residual stream (``W_o -> Qᵀ·W_o``, ``W_downᵀ -> W_downᵀ·Q``); where the next site
uses another basis, a residual adapter ``Q_prevᵀ·Q_next`` is applied once per token.  The
embedding output is rotated into the first basis and rotated back before the final norm (for
untied models both are folded into the embedding and lm_head instead).
Without rotation (``magnitude``, TEAL-style) the weights are untouched and Top-K picks the
largest entries of the real inputs.

``scaled=True`` makes Top-K rank each input entry by ``|x_j|·||W[:, j]||`` (its contribution
to the output) instead of ``|x_j|``, at no run-time cost: the column norms ``c`` are folded
into whatever produces the input (the RMSNorm weight; the v rows for o_proj's input; the up
rows for down_proj's input) and ``1/c`` into the consuming weight's columns, which leaves
the dense model unchanged."""
from __future__ import annotations

import torch

from edgesparse.backends.formats import QuantRows, int8_rows, requantised_format
from edgesparse.errors import ArtifactError
from edgesparse.models.weights import Attention, Layer, ReGLUMLP, TopKAttention, TopKMLP
from edgesparse.predictors.int8 import snap_rows
from edgesparse.predictors.rotation import block_topk_sizes, pca_rotation

ROTATIONS = ("shared", "per-site", "global")


# -- fit --------------------------------------------------------------------------------------
def fit_rotations(model, gram: dict, rotation: str = "shared") -> dict:
    """LaRoSA Q per layer and site from ``gram[tap]``, the Gram matrix of each tapped norm
    output (``layers.{i}.attn_in`` / ``mlp_in``), with the norm's weight divided out.

    ``shared``: one Q per layer for its attention and MLP inputs (one residual adapter per
    layer); ``per-site``: one Q per input (two adapters per layer); ``global``: one Q for the
    whole model from the pooled statistics (no adapters at all, only the two end rotations)."""
    grams = {}
    for i, layer in enumerate(model.layers):
        for site, norm in (("attn_in", layer.attn.norm), ("mlp_in", layer.mlp.norm)):
            inv = 1 / norm.double().cpu().abs().clamp(min=1e-6) * norm.double().cpu().sign()
            g = gram[f"layers.{i}.{site}"] * inv[:, None] * inv[None, :]
            grams[(i, site)] = g / g.trace()
    if rotation == "global":
        q = pca_rotation(sum(grams.values()))
    tensors = {}
    for i in range(len(model.layers)):
        if rotation == "per-site":
            qa, qm = pca_rotation(grams[(i, "attn_in")]), pca_rotation(grams[(i, "mlp_in")])
        elif rotation == "shared":
            qa = qm = pca_rotation(grams[(i, "attn_in")] + grams[(i, "mlp_in")])
        else:
            qa = qm = q
        tensors[f"layers.{i}.rotation.attn"] = qa.float()
        tensors[f"layers.{i}.rotation.mlp"] = qm.float()
    return tensors


def topk_sizes(spec, attn_sparsity, mlp_sparsity) -> dict:
    k_qkv, k_o = _block_ks(spec, "attn", attn_sparsity or 0.0)
    ks = {"qkv": k_qkv, "o": k_o}
    if not spec.is_reglu:
        ks["mlp"], ks["down"] = _block_ks(spec, "mlp", mlp_sparsity or 0.0)
    return ks


def _block_ks(spec, site: str, s: float) -> tuple[int, int]:
    """K of a block's rotated and unrotated input (qkv and o, or gate|up and down) at block
    sparsity ``s``."""
    nq, nkv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    if site == "attn":
        return block_topk_sizes(s, spec.hidden, nq + 2 * nkv, nq, spec.hidden)
    return block_topk_sizes(s, spec.hidden, 2 * spec.intermediate, spec.intermediate, spec.hidden)


# "measured" (topk_allocation.py): per-layer K by measured block-output error; "greedy" by
# an estimate (allocate_topk below), kept to reproduce docs/accuracy.md's comparison.
ALLOCATIONS = ("uniform", "greedy", "measured")


def _dropped_share(gram_rot_diag: torch.Tensor, col_energy: torch.Tensor) -> torch.Tensor:
    """Share of a linear's output energy lost when Top-K keeps k of d rotated inputs, for
    k = 0..d: inputs are dropped from the lowest variance up (PCA coordinates, so Top-K keeps
    mostly the leading ones), each carrying ``variance x ||W q_j||²``; ``[d + 1]``."""
    e = gram_rot_diag.clamp(min=0) * col_energy
    e = e[gram_rot_diag.argsort(descending=True)]
    kept = torch.cat([e.new_zeros(1), e.cumsum(0)])
    return 1 - kept / kept[-1].clamp(min=1e-30)


def allocate_topk(model, gram: dict, rot: dict, attn_sparsity, mlp_sparsity, step: float = 0.05,
                  spread: float = 0.1) -> list[dict]:
    """Per-layer Top-K sizes for the asked model-level sparsities, allocated greedily: every
    block starts at ``target - spread``, and the block whose next ``step`` of sparsity adds the
    least relative output error of its rotated linear (qkv, or stacked gate|up) takes it, up to
    ``target + spread``, until the blocks' mean sparsity reaches the target (attention and MLP
    blocks separately; within each the blocks are equal in size).  The error is the output
    energy of the dropped rotated inputs (``_dropped_share``, from the calibration Gram and the
    weight's column norms in the rotated basis: WINA's weighting), an estimate, checked end to
    end by ``eval ppl --compare``.  Unbounded (from 0 to 0.95), the allocation put 0.9 on some
    SmolLM2 MLPs and 0.05 on others and lost badly to the uniform one (docs/accuracy.md): the
    estimate is too coarse to be trusted far."""
    spec = model.spec
    curves = {"attn": [], "mlp": []}
    for i, layer in enumerate(model.layers):
        mats = _float_layer(model, i, layer)
        for site, norm, w in (("attn", layer.attn.norm, mats["qkv"]),
                              ("mlp", layer.mlp.norm, torch.cat([mats["gate"], mats["up"]]))):
            if site == "mlp" and (spec.is_reglu or mlp_sparsity is None):
                continue
            q = (rot[f"layers.{i}.rotation.{site}"].double() if rot is not None
                 else torch.eye(spec.hidden, dtype=torch.float64))   # magnitude Top-K: the plain basis
            gm = norm.double().cpu()
            g = gram[f"layers.{i}.{site}_in"] / (gm[:, None] * gm[None, :]).clamp(min=1e-12)   # input of W·diag(γ)
            var = ((g @ q) * q).sum(0)                                                    # qⱼᵀ G qⱼ
            col = ((w.double().cpu() * gm) @ q).pow(2).sum(0)                             # ||W diag(γ) qⱼ||²
            curves[site].append(_dropped_share(var, col))
    out = [dict() for _ in model.layers]
    for site, target in (("attn", attn_sparsity), ("mlp", mlp_sparsity)):
        if not curves[site] or not target:
            continue
        lo, hi = round(max(0.0, target - spread), 6), round(min(0.95, target + spread), 6)
        levels = [lo] * len(curves[site])

        def err(li, s):   # the rotated site's K at block sparsity s (the unrotated site follows)
            c = curves[site][li]
            d = c.numel() - 1
            k = _block_ks(spec, site, s)[0]
            return c[min(k, d)].item()
        while sum(levels) / len(levels) < target - 1e-9:
            best = min((li for li in range(len(levels)) if levels[li] + step <= hi + 1e-9),
                       key=lambda li: err(li, levels[li] + step) - err(li, levels[li]), default=None)
            if best is None:
                break
            levels[best] = round(levels[best] + step, 6)
        for li, lv in enumerate(levels):
            keys = ("qkv", "o") if site == "attn" else ("mlp", "down")
            out[li].update(zip(keys, _block_ks(spec, site, lv)))
            out[li][f"{site}_sparsity"] = lv
    uniform = topk_sizes(spec, attn_sparsity, mlp_sparsity)
    return [{**uniform, **o} for o in out]   # sites not allocated keep the uniform sizes


def rotations_from_tensors(t: dict, n_layers: int):
    """Per-layer ``(attention, MLP)`` rotation lists (float64) from artifact tensors."""
    return ([t[f"layers.{i}.rotation.attn"].double() for i in range(n_layers)],
            [t[f"layers.{i}.rotation.mlp"].double() for i in range(n_layers)])


# -- apply ------------------------------------------------------------------------------------


def _adapter(ex, q_from, q_to, dtype):
    if q_from is None or q_to is None or torch.equal(q_from, q_to):
        return None
    r = q_from.T @ q_to                       # x_new = x · r
    return ex.prepare_linear(r.T.to(dtype))   # F.linear(x, rᵀ) = x · r


def _fold(w, gamma, q, dtype, chunk=8192):
    """``w · diag(gamma) · q`` in float64, a block of rows at a time (vocab-sized matrices)."""
    q = q.double()
    g = None if gamma is None else gamma.double()
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    for i in range(0, w.shape[0], chunk):
        if isinstance(w, QuantRows):   # folded from the stored (de-quantised) values, re-quantised later
            blk = w.rows(torch.arange(i, min(i + chunk, w.shape[0])), torch.float64)
        else:
            blk = w[i:i + chunk].double()
        out[i:i + chunk] = ((blk if g is None else blk * g) @ q).to(dtype)
    return out


def _col_norms(w):
    return w.norm(dim=0).clamp(min=1e-8)


def install_topk(model, ks: dict, rot_attn=None, rot_mlp=None, scaled: bool = False) -> None:
    """``ks``: ``{"qkv": k, "o": k, "mlp": k, "down": k}`` (mlp/down only for SwiGLU), or a list
    of those, one per layer (``allocate_topk``).
    ``rot_attn[l]``, ``rot_mlp[l]``: float64 ``[d, d]`` rotations, or None for magnitude Top-K.
    Replaces each layer's Attention with a TopKAttention (and a SwiGLU's GatedMLP with a
    TopKMLP); a model that already has them is refused."""
    ex, dt, spec = model.ex, model.dtype, model.spec
    if not all(isinstance(l.attn, Attention) for l in model.layers):
        raise ArtifactError("Top-K is already installed on this model")
    saved = ex.weight_format
    if model.float_source is None:
        # Top-K layouts (Wᵀ) and folds start from the stored values, quantised a second time
        # across new axes; with the checkpoint's float values at hand they are quantised once.
        ex.weight_format = requantised_format(saved)
    try:
        _install(model, ex, dt, spec, ks, rot_attn, rot_mlp, scaled)
    finally:
        ex.weight_format = saved


def _float_layer(model, li: int, layer) -> dict[str, torch.Tensor]:
    """Layer ``li``'s matrices in float64: the checkpoint's own values where the model keeps
    its float source (``models/source.py``), else the stored (de-quantised) ones."""
    if model.float_source is not None:
        return model.float_source.layer(li)
    f = layer.mlp.ffn
    return dict(qkv=layer.attn.qkv.weight.double(), o=layer.attn.o.weight.double(), gate=f.gate.double(),
                up=f.up.double(), down_t=f.down_t.double())


def _install(model, ex, dt, spec, ks_all, rot_attn, rot_mlp, scaled):
    rotated = rot_attn is not None
    n = spec.n_layers
    for li, layer in enumerate(model.layers):
        ks = ks_all[li] if isinstance(ks_all, list) else ks_all   # per layer (allocated) or uniform
        attn, mlp = layer.attn, layer.mlp
        dev = attn.qkv.weight.device
        qa = rot_attn[li].to(dev) if rotated else None
        qm = rot_mlp[li].to(dev) if rotated else None
        mats = _float_layer(model, li, layer)
        # -- attention: qkv reads the (rotated) input; o writes into the residual basis ------
        w, bqkv = mats["qkv"].to(dev), attn.qkv.bias
        norm = attn.norm.double()
        if rotated:
            w, norm = (w * norm) @ qa, torch.ones_like(norm)
        wo, bo = mats["o"].to(dev), attn.o.bias
        if rotated:
            wo = qa.T @ wo
            bo = None if bo is None else (bo.double() @ qa).to(dt)
        if scaled:
            c = _col_norms(w)
            w, norm = w / c, norm * c
            w, bqkv, wo = _scale_v_into_o(spec, w, bqkv, wo)
        new_attn = TopKAttention(norm.to(dt), ex.prepare_topk(w.to(dt), bqkv, ks["qkv"]),
                                 ex.prepare_topk(wo.to(dt), bo, ks["o"]), _adapter(ex, qa, qm, dt))
        # -- MLP ---------------------------------------------------------------------------------
        f = mlp.ffn
        gate, up, down_t = (mats[k].to(dev) for k in ("gate", "up", "down_t"))
        mlp_norm, predictor = mlp.norm, getattr(mlp, "predictor", None)
        if rotated:
            gm = mlp_norm.double()
            gate, up, down_t = (gate * gm) @ qm, (up * gm) @ qm, down_t @ qm
            if predictor is not None:   # ReGLU predictor reads the same input
                a = qm.T @ (gm[:, None] * predictor.a.double())
                if int8_rows(predictor.a.t()) is not None:
                    # calibrated on the int8 grid: the rotated A goes back onto its own grid, so
                    # the kernels keep streaming int8 rows (a quarter of fp32's bytes: 46 MB a
                    # token on the TinyLlama shape).  Scores move by the grid's rounding, ~0.2%
                    # of a row's largest entry, against thresholds fitted on the unrotated grid.
                    a = snap_rows(a.T).T
                predictor = ex.prepare_predictor(a.to(dt), predictor.b, predictor.bias)
            mlp_norm = torch.ones_like(mlp_norm)
        if scaled and not spec.is_reglu:  # ReGLU inputs feed the SVD predictor: left as they are
            gm = mlp_norm.double()
            c = _col_norms(torch.cat([gate, up]))
            gate, up, mlp_norm = gate / c, up / c, (gm * c).to(dt)
            cd = down_t.norm(dim=1).clamp(min=1e-8)        # ||W_down[:, i]|| per neuron
            up, down_t = up * cd[:, None], down_t / cd[:, None]
        if spec.is_reglu and not rotated:   # a ReGLU FFN changes only when rotated
            new_mlp = mlp
        elif spec.is_reglu:
            ffn = ex.prepare_ffn(gate.to(dt), up.to(dt), down_t.T.to(dt), f.act)
            new_mlp = ReGLUMLP(mlp_norm, ffn, ex.prepare_linear(ffn.gate), predictor, mlp.calibrated_mode)
        else:
            new_mlp = TopKMLP(mlp_norm, ex.prepare_topk(torch.cat([gate, up]).to(dt), None, ks["mlp"]),
                              ex.prepare_topk(down_t.T.to(dt), None, ks["down"]))
        nxt = rot_attn[li + 1].to(dev) if rotated and li + 1 < n else None
        model.layers[li] = Layer(new_attn, new_mlp, _adapter(ex, qm, nxt, dt))
    if rotated:
        q_in, q_out = rot_attn[0].to(dev), rot_mlp[-1].to(dev)
        if model.lm_head.weight is not model.embed:
            # Untied: fold the rotations into the ends, E -> E·Q_first and W_head ->
            # W_head·diag(γ)·Q_last with the final norm's weight set to 1 (RMSNorm commutes with
            # an orthogonal Q), which saves two d×d GEMVs per token.
            src = model.float_source
            embed, head = model.embed, model.lm_head.weight
            folded = _fold(embed if src is None else src.embed(), None, q_in, dt)
            # the embedding keeps its blocks where they can be made from float values
            model.embed = ex.place_matrix(folded, embed.fmt if isinstance(embed, QuantRows) and src else False)
            model.lm_head = ex.prepare_linear(_fold(head if src is None else src.lm_head(), model.norm, q_out, dt),
                                              model.lm_head.bias,
                                              fmt=head.fmt if isinstance(head, QuantRows) else None)
            model.norm = torch.ones_like(model.norm)
        else:   # tied: one matrix cannot absorb both, so rotate the stream at run time
            model.in_rotation = ex.prepare_linear(q_in.T.to(dt))      # x · Q_first
            model.out_rotation = ex.prepare_linear(q_out.to(dt))      # x · Q_lastᵀ
    model.set_attn_mode("topk")
    if not spec.is_reglu:
        model.set_ffn_mode("topk")


def _scale_v_into_o(spec, w_qkv, b_qkv, wo):
    """Scale each v channel by the norm of the o_proj columns it feeds (RMS over the query
    heads sharing it under GQA) and divide those columns by it: attention is linear in v, so
    the product is unchanged while o_proj's input entries now carry their weight."""
    nq, hd = spec.n_heads * spec.head_dim, spec.head_dim
    group = spec.n_heads // spec.n_kv_heads
    c_o = _col_norms(wo).view(spec.n_kv_heads, group, hd)
    c_v = c_o.pow(2).mean(1).sqrt().reshape(-1)            # [n_kv * hd]
    w = w_qkv.clone()
    vs = slice(nq + spec.n_kv_heads * hd, None)
    w[vs] = w[vs] * c_v[:, None]
    b = None
    if b_qkv is not None:
        b = b_qkv.double().clone()
        b[vs] = b[vs] * c_v
        b = b.to(b_qkv.dtype)
    c_cols = c_v.view(spec.n_kv_heads, 1, hd).expand(spec.n_kv_heads, group, hd).reshape(-1)
    return w, b, wo / c_cols
