"""A single-sequence decode step whose every shape is fixed, so a device graph can replay it.

The ordinary decode step reads the cache up to the current length and takes its position as
a Python int: both change every token, so a captured graph (CUDA graphs: the kernels and
their arguments are recorded once and replayed) would replay the first token forever.  Here
the token and its position live in device buffers, RoPE rows are gathered at that position,
k and v are written with ``index_copy_`` at it, and attention runs over the whole cache with
a mask ``first <= slot <= position``, so each replay sees the new values.  The layers
themselves are ``DecoderModel._block``: the same executor ops as eager decode (Top-K with a
fixed K and the cuda backend's sync-free ReGLU kernels have fixed shapes already).

``Executor.capture(fn)`` turns the step into a replay (the cuda backend records a
``torch.cuda.CUDAGraph``; the default runs ``fn`` eagerly, the reference the graph is tested
against).  The graph writes into buffers made during capture, so per-layer sparsity counts
are kept as tensors the replay overwrites and added to the model's stats after each replay."""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from edgesparse.backends.interface import rope
from edgesparse.sparsity.ffn import SparsityStats


class StaticDecodeStep:
    """Logits of one token of one sequence appended to ``cache`` (batch 1), with fixed shapes."""

    def __init__(self, model, cache, mode: str, attn_sparse: bool):
        self.model, self.mode, self.attn_sparse = model, mode, attn_sparse
        self.cache_ref = weakref.ref(cache)
        self.k, self.v = cache.k, cache.v   # the graph binds these tensors' memory
        dev = model.ex.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.position = torch.zeros(1, dtype=torch.long, device=dev)
        self.first = torch.zeros(1, dtype=torch.long, device=dev)   # the sliding window's start
        self.slots = torch.arange(cache.k[0].shape[2], device=dev)
        self.counts: dict[int, SparsityStats] = {}
        self.logits = None
        self._replay = None   # captured at the first run, once the buffers hold real inputs

    def matches(self, cache, mode: str, attn_sparse: bool) -> bool:
        return self.cache_ref() is cache and (mode, attn_sparse) == (self.mode, self.attn_sparse)

    def run(self, token: torch.Tensor, position: int, first: int) -> torch.Tensor:
        """Logits ``[1, V]`` of ``token [1, 1]`` at ``position``; the cache slot is written."""
        self.token.copy_(token.view(1, 1))
        self.position.fill_(position)
        self.first.fill_(first)
        if self._replay is None:
            self._replay = self.model.ex.capture(self._step)
        self._replay()
        for li, c in self.counts.items():   # counts of this replay (tensors on the device)
            st = self.model.stats.layer(li)
            for name in ("tokens", "neurons", "gate_rows", "active_rows"):
                value = getattr(c, name)
                setattr(st, name, getattr(st, name) + (value.clone() if torch.is_tensor(value) else value))
        return self.logits.clone()

    def _step(self) -> None:
        """The computation a graph records: reads only the buffers above and the weights."""
        m, s = self.model, self.model.spec
        nq, nkv, hd = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.head_dim
        cos = m.cos.index_select(0, self.position).view(1, 1, 1, hd)
        sin = m.sin.index_select(0, self.position).view(1, 1, 1, hd)
        mask = ((self.slots <= self.position) & (self.slots >= self.first)).view(1, 1, 1, -1)

        def attend(li, qkv):
            q = rope(qkv[..., :nq].view(1, 1, s.n_heads, hd).transpose(1, 2), cos, sin)
            k = rope(qkv[..., nq:nq + nkv].view(1, 1, s.n_kv_heads, hd).transpose(1, 2), cos, sin)
            v = qkv[..., nq + nkv:].view(1, 1, s.n_kv_heads, hd).transpose(1, 2)
            self.k[li].index_copy_(2, self.position, k)
            self.v[li].index_copy_(2, self.position, v)
            att = F.scaled_dot_product_attention(q, self.k[li], self.v[li], attn_mask=mask,
                                                 enable_gqa=s.n_kv_heads != s.n_heads)
            return att.transpose(1, 2).reshape(1, 1, nq)

        # Each step's counts start from zero: the book above accumulates them across replays.
        saved, m.stats = m.stats, _FreshStats(self.counts)
        try:
            x = m._embed(self.token)
            for li, layer in enumerate(m.layers):
                x = m._block(li, layer, x, attend, self.mode, self.attn_sparse)
            logits = m._logits(x)[:, -1]
        finally:
            m.stats = saved
        if self.logits is None:
            self.logits = logits
        else:
            self.logits.copy_(logits)


class _FreshStats:
    """A StatsBook stand-in whose layers start at zero on every step (kept in ``counts``)."""

    def __init__(self, counts: dict):
        self.counts = counts

    def layer(self, i: int) -> SparsityStats:
        self.counts[i] = SparsityStats()
        return self.counts[i]
