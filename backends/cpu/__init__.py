"""The cpu backend: the reference torch ops plus the native fused kernels (``native.py``,
``csrc/``) for single-token decode, and weights copied into huge pages."""
from __future__ import annotations

import mmap
from contextlib import contextmanager

import torch

from ..formats import BLOCK_BYTES, QuantRows, TransposedRows, int8_rows
from ..interface import FFNWeights, LayerStep, LinearWeights, PredictorWeights, TopKWeights, keep_topk
from ..reference import TorchExecutor
from . import layer_step, native


class CpuExecutor(TorchExecutor):
    """Torch ops, plus the native fused kernels (``native.py``) for single-token decode when
    they built on this machine; the torch ops remain the reference and the fallback."""
    name = "cpu"
    dense_down_rows = True   # SwiGLU down projections keep W_down's own blocks (TransposedRows)
    _in_prompt = False

    @classmethod
    def availability(cls):
        return True, f"{torch.get_num_threads()} threads, {native.status()}"

    def place(self, t, dtype=None):
        t = super().place(t, dtype)
        # Already 2 MB-aligned means placed before (e.g. a tied lm_head, the gate's view for
        # exact mode): placing again must not copy the weights a second time.
        if t.numel() * t.element_size() < HUGE_PAGE or t.data_ptr() % HUGE_PAGE == 0:
            return t
        return huge_page_copy(t)

    def prepare_predictor(self, a, b, bias) -> PredictorWeights:
        # Stored transposed ([r, d] and [d_ff, r]) so each output of the native kernel reads a
        # contiguous row; the torch ops use the transposed views at no cost.  Factors that
        # calibration left on per-row int8 grids are also kept as int8 rows for the native
        # kernel (half the predictor's bytes per token; the torch ops use the float copies,
        # which hold the same values).
        # With block-quantised weights the kernels take fp32 activations, so factors that are
        # off their grid are kept as fp32 rows for them too (converted once, here).
        p = PredictorWeights(self.place(a.t()).t(), self.place(b.t()).t(), self.place(bias))
        qa, qb = int8_rows(p.a.t()), int8_rows(p.b.t())   # each may be off its grid (rotated A)
        if qa is not None or qb is not None:
            pack = lambda rows: (None, None) if rows is None else (self.place(rows.q), rows.s)  # noqa: E731
            p.packed = (*pack(qa), *pack(qb))
        if self.weight_format in BLOCK_BYTES:   # a_t [r, d], b_t [d_ff, r] where not int8 rows, bias
            f32 = lambda m, q: None if q is not None else self.place(m.float())  # noqa: E731
            p.fp32 = (f32(p.a.t(), qa), f32(p.b.t(), qb), p.bias.float().contiguous())
        return p

    @contextmanager
    def prompt(self):
        saved, self._in_prompt = self._in_prompt, True
        try:
            yield
        finally:
            self._in_prompt = saved

    def linear(self, x, w: LinearWeights):
        if isinstance(w.weight, QuantRows):
            if native.supports_quant(w.weight):
                if x.numel() == x.shape[-1]:
                    return native.q_gemv(w.weight, x.reshape(-1), w.bias).to(x.dtype).view(*x.shape[:-1], -1)
                # several tokens (prefill): integer dots over the blocks, no float copy of W
                rows = x.reshape(-1, x.shape[-1])
                out = native.q_gemm(w.weight, rows, w.bias, prompt=self._in_prompt)
                return out.to(x.dtype).view(*x.shape[:-1], -1)
            return super().linear(x, w)
        if x.numel() == x.shape[-1] and native.supports(w.weight):   # one token
            return native.gemv(w.weight, x.reshape(-1), w.bias).view(*x.shape[:-1], -1)
        return super().linear(x, w)

    def rms_norm(self, x, weight, eps):
        if x.dtype == weight.dtype and x.numel() <= BATCH_ROWS * x.shape[-1] and native.supports(weight):
            rows = x.reshape(-1, x.shape[-1])   # a decode batch: each token as it would be alone
            return torch.stack([native.rms_norm(r, weight, eps) for r in rows]).view(x.shape)
        return super().rms_norm(x, weight, eps)

    def decode_attention(self, qkv, cos, sin, cache_k, cache_v, slot, first, n_heads):
        if native.supports(cache_k, cache_v, qkv, cos, sin):
            return native.decode_attention(qkv, cos, sin, cache_k, cache_v, slot, first, n_heads)
        return super().decode_attention(qkv, cos, sin, cache_k, cache_v, slot, first, n_heads)

    def _plan(self, step: LayerStep, cache_k, act_dtype):
        # One descriptor per (layer description, cache shape), built on first use; None
        # (not covered: float weights, adapters, ...) is remembered too.
        key = (id(step), tuple(cache_k.shape), cache_k.dtype)
        plans = self.__dict__.setdefault("_layer_plans", {})
        if key not in plans:
            if len(plans) > 4096:   # caches of many lengths over a long-lived server
                plans.clear()
            plans[key] = (step, layer_step.build(step, cache_k, act_dtype))
        return plans[key][1]

    def decode_layer(self, step: LayerStep, x, cache_k, cache_v, cos, sin, slot, first):
        plan = self._plan(step, cache_k, x.dtype)
        if plan is None:
            return None
        return layer_step.run(plan, x, cache_k, cache_v, cos, sin, slot, first)

    def _stack(self, steps, caches_k, act_dtype):
        c = caches_k[0]
        key = (tuple(map(id, steps)), tuple(c.shape), c.dtype, act_dtype)
        stacks = self.__dict__.setdefault("_layer_stacks", {})
        if key not in stacks:
            if len(stacks) > 256:
                stacks.clear()
            plans = [self._plan(s, k[0], act_dtype) for s, k in zip(steps, caches_k)]
            stacks[key] = (steps, None if any(p is None for p in plans) else layer_step.Stack(plans))
        return stacks[key][1]

    def decode_layers(self, steps, x, caches_k, caches_v, cos, sin, slot, first):
        stack = self._stack(steps, caches_k, x.dtype)
        if stack is None:
            return None
        return layer_step.run_all(stack, x, caches_k, caches_v, cos, sin, slot, first)

    def decode_layers_rows(self, steps, x, caches_k, caches_v, cos, sin, slots, firsts):
        # the descriptors of the first sequence's cache shape serve all: the C step takes each
        # sequence's own length
        stack = self._stack(steps, caches_k[0], x.dtype)
        if stack is None or any(c[0].dtype != caches_k[0][0].dtype for c in caches_k):
            return None
        return layer_step.run_rows(stack, x, caches_k, caches_v, cos, sin, slots, firsts)

    def ffn_dense(self, x, w: FFNWeights):
        if isinstance(w.gate, QuantRows):
            if (x.dim() == 2 and x.shape[0] == 1 and w.act in ("relu", "silu")
                    and native.supports_dense_ffn(w.gate, w.up, w.down_t)):
                return native.q_ffn_dense(x[0], w.gate, w.up, w.down_t, w.act).to(x.dtype).unsqueeze(0)
            if (x.dim() == 2 and x.shape[0] <= BATCH_ROWS and not isinstance(w.down_t, TransposedRows)
                    and w.act in ("relu", "silu") and native.supports_dense_ffn(w.gate, w.up, w.down_t)):
                # a decode batch over a neuron-major down projection: the one-token kernel per
                # token (the batched row sums add in another order)
                return torch.stack([native.q_ffn_dense(r, w.gate, w.up, w.down_t, w.act) for r in x]).to(x.dtype)
            if x.dim() == 2 and native.supports_dense_ffn(w.gate, w.up, w.down_t):   # prefill, batches
                p = self._in_prompt   # es_prompt_gemm keeps its own row floor
                if w.act in ("relu", "silu"):   # each token's activation as the one-token kernel's
                    h = native.act_mul(native.q_gemm(w.gate, x, prompt=p), native.q_gemm(w.up, x, prompt=p), w.act)
                else:
                    h = w.act_fn(native.q_gemm(w.gate, x, prompt=p)) * native.q_gemm(w.up, x, prompt=p)
                if isinstance(w.down_t, TransposedRows):
                    return native.q_gemm(w.down_t.stored, h, prompt=p).to(x.dtype)
                return native.q_rows_gemm(w.down_t, h).to(x.dtype)   # neuron-major: row sums
            return super().ffn_dense(x, w)
        if x.dim() == 2 and x.shape[0] == 1 and native.supports(w.down_t):
            # One token: gate/up as native GEMVs, the down projection as one native pass over
            # down_t's rows (embedding_bag over all rows ran at ~8 GB/s inside decode).
            h = w.act_fn(self.linear(x, LinearWeights(w.gate))) * self.linear(x, LinearWeights(w.up))
            return native.weighted_rows(w.down_t, None, h[0]).unsqueeze(0)
        return super().ffn_dense(x, w)

    def reglu_sparse(self, x, w, p):
        if isinstance(w.gate, QuantRows):
            if x.shape[0] <= BATCH_ROWS and native.supports_ffn(w.gate, w.up, w.down_t) and (p is None or p.fp32):
                # A decode batch runs the one-token kernel per token: each token gathers its own
                # rows (their union is most rows), and its result is the one-token result.
                res = [native.q_reglu_ffn(x[i], w.gate, w.up, w.down_t,
                                          *((None,) * 4 if p is None else (*p.fp32, p.packed)), w.threshold)
                       for i in range(x.shape[0])]
                out = torch.stack([r[0] for r in res]).to(x.dtype)
                n = len(res)   # rows read per token, on average (each token read its own)
                return out, sum(r[1] for r in res) / n, sum(r[2] for r in res) / n
            return super().reglu_sparse(x, w, p)
        if x.shape[0] == 1 and native.supports(w.gate, w.up, w.down_t, *(() if p is None else (p.a.t(), p.b.t()))):
            out, n_cand, n_active = native.reglu_ffn(
                x[0], w.gate, w.up, w.down_t, *((None, None, None, None) if p is None else
                                                (p.a.t(), p.b.t(), p.bias, p.packed)), w.threshold)
            return out.unsqueeze(0), n_cand, n_active
        return super().reglu_sparse(x, w, p)

    def swiglu_stacked(self, gu):
        if gu.dim() == 2 and gu.dtype in (torch.bfloat16, torch.float32) and native.supports(gu):
            return native.swiglu(gu)
        return super().swiglu_stacked(gu)

    def topk_linear(self, x, w: TopKWeights, k=None):
        k = w.k if k is None else k
        if isinstance(w.weight_t, QuantRows):
            if native.supports_quant(w.weight_t) and x.dim() == 2:
                if x.shape[0] <= BATCH_ROWS and k < w.weight_t.shape[0]:   # decode: per token, as alone
                    out = torch.stack([native.q_topk_linear(w.weight_t, r, k) for r in x]).to(x.dtype)
                else:   # prefill (K = all) or a batch: each token's kept entries, rows read once
                    masked = x if k >= w.weight_t.shape[0] else keep_topk(x, k)
                    out = native.q_rows_gemm(w.weight_t, masked).to(x.dtype)
                return out if w.bias is None else out + w.bias
            return super().topk_linear(x, w, k)
        if x.shape[0] == 1 and k < w.weight_t.shape[0] and native.supports(w.weight_t):
            out = native.topk_linear(w.weight_t, x[0], k).unsqueeze(0)
            return out if w.bias is None else out + w.bias
        return super().topk_linear(x, w, k)


HUGE_PAGE = 2 << 20
# Up to this many tokens (a continuously batched decode step, edgesparse/batching.py) the
# gathering ops run their one-token kernel per token; more (prefill) take the masked GEMMs.
BATCH_ROWS = 16


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into 2 MB-aligned anonymous memory advised for transparent huge pages.

    Sparse decode reads scattered 4-8 KB rows spread over hundreds of MB: with 4 KB pages
    nearly every row costs a TLB miss and a page walk (a nested one in a VM).  With 2 MB pages
    the gathered rows ran ~8% faster on the dev VM (docs/performance.md).  Where the OS has
    no such advice (or THP is off) this is an ordinary private mapping and costs nothing."""
    if not (hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")):
        return t
    nbytes = t.numel() * t.element_size()
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)   # before the first touch, so faults take 2 MB pages
    except OSError:   # a kernel built without THP: ordinary pages, still correct
        pass
    raw = torch.frombuffer(buf, dtype=torch.uint8)   # the tensor's storage keeps buf alive
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(t.dtype).view(t.shape).copy_(t)
