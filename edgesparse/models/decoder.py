"""The decoder shared by every family (Llama layout), run through an executor.

Weights live in the layouts the executor prepared; every matrix product goes through the
executor, so this module never branches on the device, and the layer's weight types
(``weights.py``) say how each block runs, so it never checks a mode string either.  Prefill
runs the FFNs densely (many tokens use most neurons anyway); decode steps run each layer's
FFN in the model's ``ffn_mode``."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from edgesparse.backends.formats import QuantRows
from edgesparse.backends.interface import Executor, LayerStep, LinearWeights, rope
from edgesparse.errors import InvalidOptionError
from edgesparse.sparsity.ffn import FFN_MODES, StatsBook, record_gather
from .source import FloatSource
from .spec import ModelSpec
from .weights import Attention, GatedMLP, Layer, ReGLUMLP, TopKAttention, TopKMLP


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [B, n_kv, S, head_dim]
    v: list[torch.Tensor]
    valid: torch.Tensor    # [B, S] bool: slot holds a real (non-padding) token
    length: int = 0        # slots filled so far (same for every row: prompts are left-padded)
    padded: bool = False   # some slot holds padding (then attention needs the mask)


@dataclass
class DecoderModel:
    spec: ModelSpec
    ex: Executor
    embed: "torch.Tensor | QuantRows"   # [V, d] (rows de-quantised on lookup)
    layers: list[Layer]
    norm: torch.Tensor
    lm_head: LinearWeights
    cos: torch.Tensor          # [max_positions, head_dim] RoPE tables (transformers' own init)
    sin: torch.Tensor
    ffn_mode: str = "dense"    # how decode steps run FFNs: dense | exact | predictor (ReGLU) | topk
    attn_mode: str = "dense"   # dense | topk (needs TopKAttention layers: sparsity/larosa.py)
    in_rotation: LinearWeights | None = None    # LaRoSA: embeddings into the first basis
    out_rotation: LinearWeights | None = None   # and back before the final norm
    stats: StatsBook = field(default_factory=StatsBook)
    # The checkpoint's float matrices when the blocks were quantised from them at load
    # (models/source.py): LaRoSA folds into those, so its folds are quantised only once.
    float_source: "FloatSource | None" = field(default=None, repr=False)
    # Decode steps of one sequence run each layer in one executor call where the backend can
    # (Executor.decode_layer); False: always the composed ops (the reference it is tested against).
    fused_decode: bool = True
    # Decode steps of one sequence through a fixed-shape step the executor captures as a
    # device graph (models/static_step.py; LLM.set_graph_decode checks the backend can).
    graph_decode: bool = False
    _steps: dict = field(default_factory=dict, repr=False)
    _static: object = field(default=None, repr=False)

    @property
    def dtype(self):
        """The activations' dtype (the embeddings may be blocks: the norms never are)."""
        return self.norm.dtype

    def set_ffn_mode(self, mode: str) -> None:
        if mode not in FFN_MODES:
            raise InvalidOptionError(f"ffn mode must be one of {', '.join(FFN_MODES)}, got {mode!r}")
        mlp = self.layers[0].mlp
        if mode not in mlp.modes:
            if mode == "topk":
                raise InvalidOptionError("ffn mode 'topk' needs Top-K artifacts of a SwiGLU model")
            if not self.spec.is_reglu:
                raise InvalidOptionError(f"ffn mode {mode!r} needs a ReGLU model (hidden_act=relu)")
            raise InvalidOptionError(f"ffn mode {mode!r} is not available on {type(mlp).__name__} layers")
        if mode == "predictor" and any(l.mlp.predictor is None and l.mlp.calibrated_mode == "predictor"
                                       for l in self.layers):
            raise InvalidOptionError("ffn mode 'predictor' needs calibration artifacts (see `edgesparse calibrate`)")
        self.ffn_mode = mode

    def set_attn_mode(self, mode: str) -> None:
        if mode not in ("dense", "topk"):
            raise InvalidOptionError(f"attention mode must be dense or topk, got {mode!r}")
        if mode == "topk" and not isinstance(self.layers[0].attn, TopKAttention):
            raise InvalidOptionError("attention mode 'topk' needs Top-K artifacts (calibrate --attn-sparsity)")
        self.attn_mode = mode

    def sparsity_in_use(self) -> dict:
        """What the current modes skip, in every mode: ReGLU FFN and gate rows skipped over the
        tokens counted since ``stats.reset()`` (None where no ReGLU FFN runs sparse), and the
        share of each Top-K site's input kept per token (mean over layers; absent when dense)."""
        counted = self.ffn_mode in ("exact", "predictor")
        out = dict(ffn_mode=self.ffn_mode, attn_mode=self.attn_mode,
                   **{k: (v if counted else (0.0 if self.ffn_mode == "dense" else None))
                      for k, v in self.stats.summary().items()})
        kept: dict[str, list[float]] = {}
        for layer in self.layers:
            sites = []
            if self.attn_mode == "topk" and isinstance(layer.attn, TopKAttention):
                sites += [("qkv", layer.attn.qkv), ("o", layer.attn.o)]
            if self.ffn_mode == "topk" and isinstance(layer.mlp, TopKMLP):
                sites += [("gate_up", layer.mlp.gate_up), ("down", layer.mlp.down)]
            for name, w in sites:
                kept.setdefault(name, []).append(w.k / w.weight_t.shape[0])
        out["topk_kept"] = {k: round(sum(v) / len(v), 4) for k, v in kept.items()}
        return out

    @contextmanager
    def modes(self, ffn: str | None = None, attn: str | None = None):
        """Run a block with other FFN / attention modes (validated), then restore the old ones."""
        saved = (self.ffn_mode, self.attn_mode)
        try:
            if ffn is not None:
                self.set_ffn_mode(ffn)
            if attn is not None:
                self.set_attn_mode(attn)
            yield self
        finally:
            self.ffn_mode, self.attn_mode = saved

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        s = self.spec
        shape = (batch, s.n_kv_heads, max_len, s.head_dim)
        mk = lambda: torch.zeros(shape, dtype=self.dtype, device=self.ex.device)  # noqa: E731
        return KVCache([mk() for _ in range(s.n_layers)], [mk() for _ in range(s.n_layers)],
                       torch.zeros(batch, max_len, dtype=torch.bool, device=self.ex.device))

    def forward(self, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                valid: torch.Tensor | None = None, all_logits: bool = False,
                sparse_prefill: bool = False) -> torch.Tensor:
        """Run ``ids [B, T]`` at ``positions [B, T]``, appending to ``cache``.

        ``valid [B, T]`` marks real tokens (False = left padding).  Returns logits of the last
        position ``[B, V]``, or of every position ``[B, T, V]`` with ``all_logits``.
        ``sparse_prefill`` applies the decode-time FFN mode to every token of a multi-token
        forward (used by evaluation, so its perplexity sees exactly the decode sparsity)."""
        s = self.spec
        B, T = ids.shape
        start, end, first = self._span(cache, T)
        cache.valid[:, start:end] = True if valid is None else valid
        cache.padded = cache.padded or (valid is not None and not bool(valid.all()))
        # One token of one unpadded sequence (every decode step of a single chat) takes the
        # executor's fused attention; anything else the general masked path.
        single = B == 1 and T == 1 and not cache.padded
        if single:
            cos, sin = self.cos[positions[0, 0]], self.sin[positions[0, 0]]
        else:
            mask = self._attention_mask(cache, start, end)
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        sparse = T == 1 or sparse_prefill
        mode = self.ffn_mode if sparse else "dense"
        attn_sparse = sparse and self.attn_mode == "topk"
        if single and self.graph_decode and not all_logits:
            cache.length = end
            return self._static_step(cache, mode, attn_sparse).run(ids, start, first)
        x = self._embed(ids)
        nq, nkv, hd = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.head_dim
        layers = self.layers
        if single and self.fused_decode:   # every layer in one executor call where it can
            done = self._decode_all(x, cache, cos, sin, start, first, mode, attn_sparse)
            if done is not None:
                x, layers = done, ()

        def attend(li, qkv):
            if single:
                return self.ex.decode_attention(qkv.view(-1), cos, sin, cache.k[li][0], cache.v[li][0],
                                                start, first, s.n_heads).view(1, 1, nq)
            q = qkv[..., :nq].view(B, T, s.n_heads, hd).transpose(1, 2)
            k = qkv[..., nq:nq + nkv].view(B, T, s.n_kv_heads, hd).transpose(1, 2)
            v = qkv[..., nq + nkv:].view(B, T, s.n_kv_heads, hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            cache.k[li][:, :, start:end] = k
            cache.v[li][:, :, start:end] = v
            att = F.scaled_dot_product_attention(q, cache.k[li][:, :, :end], cache.v[li][:, :, :end],
                                                 attn_mask=mask, enable_gqa=s.n_kv_heads != s.n_heads)
            return att.transpose(1, 2).reshape(B, T, nq)

        with self.ex.prompt() if T > 1 else nullcontext():   # a prompt may round otherwise
            for li, layer in enumerate(layers):
                step = self._layer_step(li, layer, mode, attn_sparse) if single and self.fused_decode else None
                done = step and self.ex.decode_layer(step, x.view(-1), cache.k[li][0], cache.v[li][0], cos, sin,
                                                     start, first)
                if done:
                    x = done[0].view(1, 1, -1)
                    if step.ffn_sparse:
                        record_gather(self.stats.layer(li), 1, step.ffn.gate.shape[0], done[1], done[2])
                    continue
                x = self._block(li, layer, x, attend, mode, attn_sparse)
            logits = self._logits(x if all_logits else x[:, -1:])
        cache.length = end
        return logits if all_logits else logits[:, -1]

    def decode_rows(self, tokens: list[int], caches: list[KVCache], positions: list[int]) -> torch.Tensor:
        """One decode step of ``len(tokens)`` independent sequences, each appending one token to
        its own single-sequence cache at its own position (continuous batching,
        ``edgesparse/batching.py``): every projection and FFN runs once for all the tokens, so
        each weight streams once, and attention runs per sequence with the single-sequence op.
        Returns logits ``[B, V]``."""
        s, B = self.spec, len(tokens)
        nq = s.n_heads * s.head_dim
        spans = [self._span(c, 1) for c in caches]
        starts, firsts = [sp[0] for sp in spans], [sp[2] for sp in spans]
        cos, sin = self.cos[positions], self.sin[positions]
        x = self._embed(torch.tensor(tokens, device=self.ex.device)[:, None])
        done = self._decode_all_rows(x, caches, cos, sin, starts, firsts) if self.fused_decode else None
        if done is not None:
            x = done
            layers = ()
        else:
            layers = self.layers

        def attend(li, qkv):
            return torch.stack([self.ex.decode_attention(qkv[b].view(-1), cos[b], sin[b], caches[b].k[li][0],
                                                         caches[b].v[li][0], starts[b], firsts[b], s.n_heads)
                                for b in range(B)]).view(B, 1, nq)

        for li, layer in enumerate(layers):
            x = self._block(li, layer, x, attend, self.ffn_mode, self.attn_mode == "topk")
        for c, st in zip(caches, starts):
            c.valid[:, st] = True
            c.length = st + 1
        return self._logits(x)[:, -1]

    def _span(self, cache: KVCache, n: int) -> tuple[int, int, int]:
        """``(start, end, first)`` of ``n`` new tokens in ``cache``: the slots they fill and the
        first slot the last of them attends to (the sliding window's start, else 0)."""
        start = cache.length
        end = start + n
        if end > cache.k[0].shape[2]:
            raise InvalidOptionError(f"sequence of {end} tokens exceeds the cache ({cache.k[0].shape[2]})")
        return start, end, max(0, end - self.spec.sliding_window) if self.spec.sliding_window else 0

    def _static_step(self, cache: KVCache, mode: str, attn_sparse: bool):
        """The fixed-shape step bound to ``cache`` (made, and captured, again for a new cache)."""
        from .static_step import StaticDecodeStep
        if self._static is None or not self._static.matches(cache, mode, attn_sparse):
            self._static = StaticDecodeStep(self, cache, mode, attn_sparse)
        return self._static

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        x = (self.embed.rows(ids.reshape(-1), self.dtype).view(B, T, -1) if isinstance(self.embed, QuantRows)
             else F.embedding(ids, self.embed))
        return x if self.in_rotation is None else self.ex.linear(x, self.in_rotation)

    def _block(self, li: int, layer: Layer, x, attend, mode: str, attn_sparse: bool):
        """One decoder layer composed from executor ops; ``attend(li, qkv)`` is the attention."""
        attn, mlp = layer.attn, layer.mlp
        h = self.ex.rms_norm(x, attn.norm, self.spec.eps)
        x = x + attn.project(self.ex, attend(li, attn.project(self.ex, h, "qkv", attn_sparse)), "o", attn_sparse)
        if attn.adapter is not None:
            x = self.ex.linear(x, attn.adapter)
        h = self.ex.rms_norm(x, mlp.norm, self.spec.eps)
        x = x + mlp.run(self.ex, h, mode, self.stats.layer(li))
        if layer.adapter is not None:
            x = self.ex.linear(x, layer.adapter)
        return x

    def _logits(self, x):
        if self.out_rotation is not None:
            x = self.ex.linear(x, self.out_rotation)
        return self.ex.linear(self.ex.rms_norm(x, self.norm, self.spec.eps), self.lm_head)

    def _decode_all(self, x, cache, cos, sin, start, first, mode, attn_sparse):
        """x after every layer through ``Executor.decode_layers``, or None (then layer by layer)."""
        steps = self._layer_steps(mode, attn_sparse)
        done = steps and self.ex.decode_layers(steps, x.view(-1), cache.k, cache.v, cos, sin, start, first)
        if not done:
            return None
        out, counts = done
        self._record_rows(steps, [[c] for c in counts])
        return out.view(1, 1, -1)

    def _decode_all_rows(self, x, caches, cos, sin, starts, firsts):
        """``decode_rows``' layers through ``Executor.decode_layers_rows``, or None."""
        steps = self._layer_steps(self.ffn_mode, self.attn_mode == "topk")
        done = steps and self.ex.decode_layers_rows(steps, x.view(x.shape[0], -1), [c.k for c in caches],
                                                    [c.v for c in caches], cos, sin, starts, firsts)
        if not done:
            return None
        out, counts = done
        self._record_rows(steps, counts.tolist())
        return out.view(x.shape)

    def _layer_steps(self, mode: str, attn_sparse: bool) -> list[LayerStep] | None:
        """Every layer's ``LayerStep``, or None when one layer has none."""
        steps = [self._layer_step(li, layer, mode, attn_sparse) for li, layer in enumerate(self.layers)]
        return None if any(st is None for st in steps) else steps

    def _record_rows(self, steps, counts) -> None:
        """``counts[layer]``: the (gate rows, active rows) of each token the native step ran;
        recorded per layer, as calibration may leave some layers dense."""
        for li, step in enumerate(steps):
            if step.ffn_sparse:
                for gate_rows, active in counts[li]:
                    record_gather(self.stats.layer(li), 1, step.ffn.gate.shape[0], gate_rows, active)

    def _layer_step(self, li: int, layer: Layer, mode: str, attn_sparse: bool) -> LayerStep | None:
        """The layer as one ``LayerStep`` for ``Executor.decode_layer`` (cached while the layer's
        attention, MLP, predictor and adapter objects stay the same), or None for layers it
        cannot describe: a Top-K attention or MLP run densely (K = all is the prefill path's)."""
        attn, mlp = layer.attn, layer.mlp
        pred = getattr(mlp, "predictor", None)
        objs = (attn, mlp, pred, layer.adapter)
        hit = self._steps.get((li, mode, attn_sparse))
        if hit is not None and all(a is b for a, b in zip(hit[0], objs)):
            return hit[1]
        step = None
        usable_attn = type(attn) is Attention or (type(attn) is TopKAttention and attn_sparse)
        common = dict(n_heads=self.spec.n_heads, eps=self.spec.eps, attn_adapter=attn.adapter, adapter=layer.adapter)
        if usable_attn and type(mlp) in (GatedMLP, ReGLUMLP):
            eff = mlp.effective_mode(mode) if type(mlp) is ReGLUMLP else mode
            step = LayerStep(attn.norm, attn.qkv, attn.o, mlp.norm, mlp.ffn, eff in ("exact", "predictor"),
                             pred if eff == "predictor" else None, **common)
        elif usable_attn and type(mlp) is TopKMLP and mode == "topk":
            step = LayerStep(attn.norm, attn.qkv, attn.o, mlp.norm, None, False, None,
                             topk_mlp=(mlp.gate_up, mlp.down), **common)
        self._steps[(li, mode, attn_sparse)] = (objs, step)
        return step

    def _attention_mask(self, cache: KVCache, start: int, end: int) -> torch.Tensor:
        """Boolean ``[B, 1, T, end]``: causal, no padding slots, within the sliding window."""
        q_pos = torch.arange(start, end, device=self.ex.device)[:, None]
        k_pos = torch.arange(end, device=self.ex.device)[None, :]
        allowed = k_pos <= q_pos
        if self.spec.sliding_window:
            allowed = allowed & (k_pos > q_pos - self.spec.sliding_window)
        mask = allowed[None] & cache.valid[:, None, :end]
        # A padding query would attend to nothing (NaN); let it see itself.  Its output is unused.
        mask = mask | (k_pos == q_pos)[None]
        return mask[:, None]
