"""The conditional-computation executor interface: the operations a sparse decoder layer needs.

Every backend (cpu, cuda, cann) implements this one ABC.  Model code outside ``backends/``
talks only to it, so nothing else branches on the device.  Conventions:

* activations ``x`` are ``[B, d_in]`` (B tokens decoded together, usually 1);
* a *linear* holds ``weight [d_out, d_in]`` as in ``torch.nn.Linear``;
* a *gated FFN* holds ``gate``/``up`` as ``[d_ff, d]`` and the down projection **transposed**,
  ``down_t [d_ff, d]``, so the weights of one neuron are three contiguous rows and a gather
  over active neurons reads only those rows;
* a *Top-K linear* stores ``weight_t [d_in, d_out]`` so the columns matching the kept
  input entries are contiguous rows;
* any of these matrices is a float tensor or, when the executor's ``weight_format`` is a
  block format (``formats.py``: q8_0, q4_0), a ``QuantRows`` of the same shape whose rows are
  the rows above, so a sparse op that skips a row skips whole blocks.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .formats import QuantRows, TransposedRows, quantizable, quantize_rows, requantised_format

Weight = "torch.Tensor | QuantRows"


@dataclass
class LinearWeights:
    weight: Weight        # [d_out, d_in]
    bias: torch.Tensor | None = None


@dataclass
class TopKWeights:
    weight_t: Weight        # [d_in, d_out]: the rows of kept inputs are contiguous
    bias: torch.Tensor | None
    k: int                  # entries of the input kept per token


@dataclass
class FFNWeights:
    gate: Weight          # [d_ff, d]
    up: Weight            # [d_ff, d]
    down_t: Weight        # [d_ff, d]  (W_down transposed)
    act: str              # "relu" / "fatrelu" (ReGLU: the gate kept where > threshold) or "silu" (SwiGLU)
    threshold: float = 0.0   # FATReLU's t; 0 for ReLU

    def act_fn(self, g: torch.Tensor) -> torch.Tensor:
        """This FFN's activation of gate values ``g`` (FATReLU with its threshold)."""
        return activate(g, self.act, self.threshold)


@dataclass
class PredictorWeights:
    a: torch.Tensor     # [d, r]
    b: torch.Tensor     # [r, d_ff]
    bias: torch.Tensor  # [d_ff]: per-neuron thresholds folded in (score > 0 <=> predicted active)
    packed: object = None   # a backend's own compact copy of a and b (cpu: int8 rows), or None
    fp32: object = None     # a backend's fp32 copies (cpu, for kernels with fp32 activations)


@dataclass
class LayerStep:
    """One decoder layer of a single-token, single-sequence decode step, in the executor's own
    weight types, for backends that run a whole layer in one call (``Executor.decode_layer``):
    x + attn(norm(x)) [then · attn_adapter], then + mlp(norm(x)) [then · adapter].
    ``qkv``/``o`` are dense (LinearWeights) or Top-K (TopKWeights, ``k`` inputs kept).  The MLP
    is ``ffn``, run densely (``ffn_sparse`` False) or as a sparse ReGLU, exact (``predictor``
    None) or predictor-sparse; or, with ``ffn`` None, a SwiGLU under Top-K: ``topk_mlp`` =
    (gate and up stacked ``[d -> 2 d_ff]``, down ``[d_ff -> d]``), with ``swiglu_stacked``
    between them.  The adapters are LaRoSA's residual basis changes (None: none)."""
    attn_norm: torch.Tensor
    qkv: "LinearWeights | TopKWeights"
    o: "LinearWeights | TopKWeights"
    mlp_norm: torch.Tensor
    ffn: FFNWeights | None
    ffn_sparse: bool
    predictor: PredictorWeights | None
    n_heads: int
    eps: float
    topk_mlp: "tuple[TopKWeights, TopKWeights] | None" = None
    attn_adapter: LinearWeights | None = None
    adapter: LinearWeights | None = None


class Executor(ABC):
    """One backend.  Subclasses set ``name`` and implement the operations below."""

    name: str = "abstract"

    def __init__(self, device: torch.device | str, weight_format: str | None = None):
        self.device = torch.device(device)
        # None: matrices keep the dtype they are given; "q8_0"/"q4_0": prepare_* quantise
        # every matrix whose rows are whole blocks (others stay float: see ``quantizable``).
        self.weight_format = weight_format

    # -- discovery ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """``(usable, reason)``: reason says why not, or what device would be used."""

    @classmethod
    def default_device(cls) -> str:
        return "cpu"

    # -- weight preparation (once, at load) ----------------------------------------------------
    def place(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Move a tensor to this backend's device, contiguous, optionally cast."""
        return t.to(device=self.device, dtype=dtype or t.dtype).contiguous()

    def place_matrix(self, m, fmt: str | None | bool = None):
        """A weight matrix in the layout the kernels stream: ``fmt`` (default: this executor's
        ``weight_format``; False: as it is) where its rows are whole blocks, else a float tensor."""
        if isinstance(m, QuantRows):   # already blocks (a GGUF tensor, a tied lm_head, exact mode's gate)
            return m if m.device == self.device else replace(m, data=self.place(m.data))
        if fmt is False:
            return self.place(m)
        fmt = self.weight_format if fmt is None else fmt
        if quantizable(m, fmt):
            q = quantize_rows(m, fmt)
            return QuantRows(q.fmt, self.place(q.data), q.cols)
        return self.place(m)

    def prepare_linear(self, weight, bias=None, fmt: str | None = None) -> LinearWeights:
        return LinearWeights(self.place_matrix(weight, fmt), None if bias is None else self.place(bias))

    # True where the dense FFN reads a TransposedRows down projection (W_down's own row-major
    # blocks, formats.py); then SwiGLU FFNs, which only ever run densely, keep that layout.
    dense_down_rows = False

    def prepare_ffn(self, gate, up, down, act: str, threshold: float = 0.0) -> FFNWeights:
        """``down``: ``W_down [d, d_ff]`` (float), QuantRows already neuron-major (``[d_ff, d]``),
        or TransposedRows (W_down's blocks as a GGUF file holds them).  ReGLU FFNs, and every FFN
        of an executor without ``dense_down_rows``, get the neuron-major layout."""
        row_major = act == "silu" and self.dense_down_rows
        if isinstance(down, TransposedRows):
            down_t = down if row_major else quantize_rows(down.rows(), requantised_format(down.fmt))
        elif isinstance(down, QuantRows):
            down_t = down
        elif row_major and quantizable(down, self.weight_format):
            q = quantize_rows(down, self.weight_format)
            down_t = TransposedRows(q.fmt, q.data, q.cols)
        else:
            down_t = down.t()
        return FFNWeights(self.place_matrix(gate), self.place_matrix(up), self.place_matrix(down_t), act, threshold)

    def prepare_topk(self, weight, bias, k: int) -> TopKWeights:
        return TopKWeights(self.place_matrix(weight.t()), None if bias is None else self.place(bias), int(k))

    def prepare_predictor(self, a, b, bias) -> PredictorWeights:
        return PredictorWeights(self.place(a), self.place(b), self.place(bias))

    # -- operations ----------------------------------------------------------------------------
    @abstractmethod
    def linear(self, x: torch.Tensor, w: LinearWeights) -> torch.Tensor:
        """Dense ``x @ W.T + b``; x may be ``[..., d_in]``."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dim as transformers computes it: in fp32, rounded to the
        activation dtype before the weight multiplies."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def decode_layer(self, step: LayerStep, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, slot: int, first: int):
        """Run one whole layer of a decode step in one call, or return None to have the
        decoder compose it from the operations below (the default, and the reference).
        ``x [d]`` is one token's residual stream; arguments as ``decode_attention``.  Returns
        ``(x_out [d], gate_rows, active_rows)``: the FFN's row counts as ``reglu_sparse``'s."""
        return None

    def decode_layers(self, steps: list[LayerStep], x: torch.Tensor, caches_k: list[torch.Tensor],
                      caches_v: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, slot: int, first: int):
        """Every layer of a decode step in one call (``caches_*[l]``: layer l's ``[1, n_kv, S,
        head_dim]``), or None to have the decoder go layer by layer (the default).  Returns
        ``(x_out [d], [(gate_rows, active_rows) per layer])``."""
        return None

    def decode_layers_rows(self, steps: list[LayerStep], x: torch.Tensor, caches_k: list[list[torch.Tensor]],
                           caches_v: list[list[torch.Tensor]], cos: torch.Tensor, sin: torch.Tensor,
                           slots: list[int], firsts: list[int]):
        """One decode step of B independent sequences through every layer in one call
        (continuous batching): ``x [B, d]``, ``caches_*[b][l]`` sequence b's layer-l cache,
        ``cos``/``sin [B, head_dim]``, ``slots``/``firsts`` per sequence as in
        ``decode_attention``.  Each token's result must be the one ``decode_layers`` gives it
        alone.  Returns ``(x_out [B, d], counts [n_layers, B, 2])`` or None to have the decoder
        compose the step (the default)."""
        return None

    def decode_attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                         cache_v: torch.Tensor, slot: int, first: int, n_heads: int) -> torch.Tensor:
        """Attention for one new token of one sequence with no padding: ``qkv [nq + 2 nkv]``
        its fused projections, ``cos``/``sin [head_dim]`` its RoPE row.  Rotates q and k,
        writes k and v into ``cache_k``/``cache_v [n_kv, S, head_dim]`` at ``slot`` and
        attends over slots ``first..slot``.  Returns ``[n_heads * head_dim]``.  Backends fuse
        this (decode runs it once per layer per token); the default is the general path's ops."""
        n_kv, _, hd = cache_k.shape
        nq, nkv = n_heads * hd, n_kv * hd
        q = rope(qkv[:nq].view(n_heads, 1, hd), cos, sin)
        cache_k[:, slot] = rope(qkv[nq:nq + nkv].view(n_kv, hd), cos, sin)
        cache_v[:, slot] = qkv[nq + nkv:].view(n_kv, hd)
        att = F.scaled_dot_product_attention(q[None], cache_k[None, :, first:slot + 1], cache_v[None, :, first:slot + 1],
                                             enable_gqa=n_kv != n_heads)
        return att.reshape(nq)

    @abstractmethod
    def ffn_dense(self, x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
        """Dense gated FFN ``down(act(gate x) * up x)`` for ``x [..., d]``."""

    @abstractmethod
    def gate_rows(self, x: torch.Tensor, w: FFNWeights, idx: torch.Tensor) -> torch.Tensor:
        """Gate pre-activations of neurons ``idx`` only: ``[B, len(idx)]``."""

    @abstractmethod
    def up_down_rows(self, x: torch.Tensor, h: torch.Tensor, w: FFNWeights,
                     idx: torch.Tensor) -> torch.Tensor:
        """Given activated gate values ``h [B, n]`` of neurons ``idx``, return
        ``(h * (x @ up[idx].T)) @ down_t[idx]`` -> ``[B, d]``, touching only those rows."""

    def ffn_active(self, x: torch.Tensor, w: FFNWeights, idx: torch.Tensor) -> torch.Tensor:
        """Gated FFN over the given active neurons only (gather gate/up rows, act*mul, down)."""
        return self.up_down_rows(x, w.act_fn(self.gate_rows(x, w, idx)), w, idx)

    def reglu_sparse(self, x: torch.Tensor, w: FFNWeights,
                     p: PredictorWeights | None) -> tuple[torch.Tensor, int, int]:
        """ReGLU FFN of ``x [B, d]`` reading only the rows that matter: candidates from the
        predictor ``p`` (every neuron when None: exact mode), the gate for candidates, up/down
        where ReLU(gate) > 0 for some row.  Returns ``(out [B, d], candidates, active)``: rows
        read per token (an op that gathers once for the batch: the union; one that runs each
        token alone, as the cpu backend does for decode batches: the mean over the tokens);
        ints or floats, or 0-d device tensors where reading them would stall the device.
        Backends may fuse this; the default composes the operations above."""
        if p is None:
            h = w.act_fn(self.linear(x, LinearWeights(w.gate)))
            idx = self.nonzero_columns(h > 0)
            return self.up_down_rows(x, h[:, idx], w, idx), w.gate.shape[0], idx.numel()
        cand, own = self.predicted_neurons(x, p)
        h = w.act_fn(self.gate_rows(x, w, cand))
        if own is not None:  # union of candidates: each token keeps only its own predictions
            h = h * own
        keep = self.nonzero_columns(h > 0)
        return self.up_down_rows(x, h[:, keep], w, cand[keep]), cand.numel(), keep.numel()

    @abstractmethod
    def topk_linear(self, x: torch.Tensor, w: TopKWeights, k: int | None = None) -> torch.Tensor:
        """Keep the ``k`` (default ``w.k``) largest-magnitude entries of each row of
        ``x [B, d_in]`` and multiply only the matching rows of ``weight_t``.  ``[B, d_out]``.
        ``k >= d_in`` is the dense product."""

    def swiglu_stacked(self, gu: torch.Tensor) -> torch.Tensor:
        """``silu(g) * u`` of ``gu [B, 2 d_ff]``, gate and up stacked (a Top-K MLP's one linear),
        in gu's dtype.  A backend whose layer step computes this natively uses the same code
        here, so both paths keep the same Top-K entries of the result."""
        f = gu.shape[-1] // 2
        return F.silu(gu[..., :f]) * gu[..., f:]

    @abstractmethod
    def lowrank_scores(self, x: torch.Tensor, p: PredictorWeights) -> torch.Tensor:
        """Predictor scores ``(x @ A) @ B + bias`` -> ``[B, d_ff]``."""

    def predicted_neurons(self, x: torch.Tensor, p: PredictorWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Candidate neurons ``(idx, own_mask)``: ``idx`` the union over rows of ``score > 0``;
        ``own_mask [B, len(idx)]`` says which row predicted which (None when B == 1)."""
        mask = self.lowrank_scores(x, p) > 0
        idx = self.nonzero_columns(mask)
        return idx, (mask[:, idx] if x.shape[0] > 1 else None)

    def nonzero_columns(self, mask: torch.Tensor) -> torch.Tensor:
        """Compact list of columns of ``mask [B, n]`` that are true for any row (the union
        of per-token active sets; for B == 1 simply that token's set)."""
        return mask.any(dim=0).nonzero().flatten()

    def device_name(self) -> str | None:
        """The accelerator's model name (benchmarks look up its peak bandwidth), None on the CPU."""
        return None

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); a no-op on the CPU."""

    # Whether ``capture`` records a device graph (True: replays skip launch and Python costs).
    captures_graphs = False

    @contextmanager
    def prompt(self):
        """The ops inside compute a prompt (a forward of several positions per sequence): a
        backend may take kernels whose fp32 rounding differs from its decode kernels' (the cpu
        backend's repacked-tile GEMM).  Decode steps, alone or batched, never run inside, so a
        batched sequence's tokens stay equal to its tokens alone."""
        yield

    def capture(self, fn):
        """A replay of ``fn``, a step with fixed shapes that reads and writes only tensors it
        already holds (``models/static_step.py``).  The default runs ``fn`` itself on each
        replay: the eager reference a backend's graph is tested against."""
        return fn


def activate(g: torch.Tensor, act: str, threshold: float = 0.0) -> torch.Tensor:
    if act == "relu":
        return torch.relu(g)
    if act == "fatrelu":   # g where g > t, else 0 (t >= 0, so the kept values are positive)
        return torch.where(g > threshold, g, torch.zeros((), dtype=g.dtype, device=g.device))
    if act == "silu":
        return torch.nn.functional.silu(g)
    raise ValueError(f"unknown activation {act!r}")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (Llama, Mistral, Qwen2), as transformers
    computes it in the activation dtype."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``|x|`` along the last dim, ties going to the lower index
    (a stable sort), so every backend and the native kernels keep the same entries even when
    magnitudes tie, which bf16 activations and GQA-repeated values often do."""
    return torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[..., :k]


def keep_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x [B, d]`` with all but each row's ``topk_indices`` zeroed: a batch's per-token Top-K
    as one masked product (the union of kept rows over several tokens is most rows)."""
    idx = topk_indices(x, k)
    return torch.zeros_like(x).scatter_(1, idx, x.gather(1, idx))
