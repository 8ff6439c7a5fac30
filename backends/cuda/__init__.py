"""The cuda backend: NVIDIA GPUs (desktop and Jetson).

Sparse ops run as Triton kernels (``kernels.py``); dense linears use cuBLAS through torch.
Without Triton (common on Jetson) the torch ops of the cpu backend run on the GPU instead:
``CudaExecutor.availability`` says which."""
from __future__ import annotations

import functools

import torch

from ..reference import TorchExecutor
from ..formats import QuantRows
from ..interface import FFNWeights, PredictorWeights, TopKWeights, topk_indices


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
        from . import kernels  # noqa: F401
    except Exception as e:  # ImportError, or a broken install on aarch64
        return False, f"triton unavailable ({type(e).__name__}: {e}); using torch ops"
    return True, f"triton {triton.__version__}"


class CudaExecutor(TorchExecutor):
    name = "cuda"

    def __init__(self, device, use_triton: bool | None = None):
        super().__init__(device)
        self.kernels = self.qkernels = None
        if use_triton if use_triton is not None else triton_status()[0]:
            from . import kernels, row_kernels
            self.kernels, self.qkernels = kernels, row_kernels

    @classmethod
    def availability(cls):
        if not torch.cuda.is_available():
            why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
            return False, why
        return True, f"{torch.cuda.get_device_name(0)}; {triton_status()[1]}"

    @classmethod
    def default_device(cls):
        return "cuda:0"

    def device_name(self):
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def captures_graphs(self) -> bool:
        return self.device.type == "cuda"

    def capture(self, fn):
        """``fn`` recorded as a CUDA graph after two warm-up runs on a side stream (Triton
        compiles and cuBLAS picks its kernels there, outside the capture); the replay launches
        the whole step at once.  The warm-ups compute the step for real, so ``fn`` must be
        idempotent for the inputs it holds (the static decode step is: same slot, same token)."""
        if self.device.type != "cuda":
            return fn
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    # -- sparse ops as Triton kernels (fall back to the torch versions without Triton) -------
    # Float weights: kernels.py.  Block-quantised weights (QuantRows): row_kernels.py, two
    # gather kernels the quantised ops below compose (the fused float ReGLU kernel is not
    # written for blocks: quantised ReGLU decode takes the interface's composition of them).
    def _triton(self, w) -> bool:
        return self.kernels is not None and not isinstance(w, QuantRows)

    def _quant(self, *ws) -> bool:
        return self.qkernels is not None and all(isinstance(w, QuantRows) for w in ws)

    def _all(self, w):
        return torch.arange(w.shape[0], device=self.device)

    def linear(self, x, w):
        if not self._quant(w.weight):
            return super().linear(x, w)
        flat = x.reshape(-1, x.shape[-1])
        out = self.qkernels.rows_dot(flat, w.weight, self._all(w.weight)).to(x.dtype)
        out = out if w.bias is None else out + w.bias
        return out.view(*x.shape[:-1], -1)

    def ffn_dense(self, x, w: FFNWeights):
        if not self._quant(w.gate, w.up, w.down_t) or x.dim() != 2:
            return super().ffn_dense(x, w)
        qk, rows = self.qkernels, self._all(w.gate)
        h = w.act_fn(qk.rows_dot(x, w.gate, rows)) * qk.rows_dot(x, w.up, rows)
        return qk.rows_matvec(h, w.down_t, rows).to(x.dtype)

    def gate_rows(self, x, w: FFNWeights, idx):
        if self._quant(w.gate):
            return self.qkernels.rows_dot(x, w.gate, idx).to(x.dtype)
        if not self._triton(w.gate):
            return super().gate_rows(x, w, idx)
        return self.kernels.gate_up_act(x, w.gate, None, idx).to(x.dtype)

    def up_down_rows(self, x, h, w: FFNWeights, idx):
        if self._quant(w.up, w.down_t):
            u = self.qkernels.rows_dot(x, w.up, idx)
            return self.qkernels.rows_matvec(h.float() * u, w.down_t, idx).to(x.dtype)
        if not self._triton(w.gate):
            return super().up_down_rows(x, h, w, idx)
        u = self.kernels.gate_up_act(x, w.up, None, idx)
        return self.kernels.rows_matvec(h.float() * u, w.down_t, idx).to(x.dtype)

    def ffn_active(self, x, w: FFNWeights, idx):
        if self._quant(w.gate) or w.act != "relu":   # the kernel's ACT is ReLU or SiLU
            return super().ffn_active(x, w, idx)   # gate_rows + up_down_rows above
        if not self._triton(w.gate):
            return super().ffn_active(x, w, idx)
        h = self.kernels.gate_up_act(x, w.gate, w.up, idx, w.act)
        return self.kernels.rows_matvec(h, w.down_t, idx).to(x.dtype)

    def topk_linear(self, x, w: TopKWeights, k=None):
        k = w.k if k is None else k
        quant = self._quant(w.weight_t)
        if not (quant or self._triton(w.weight_t)) or k >= w.weight_t.shape[0] or x.shape[0] > 8:
            return super().topk_linear(x, w, k)
        sel = topk_indices(x, k)
        if x.shape[0] == 1:
            rows = sel[0].sort().values
            coef = x[:, rows]
        else:  # per-token Top-K over the union of kept rows
            keep = torch.zeros_like(x, dtype=torch.bool).scatter_(1, sel, True)
            rows = keep.any(0).nonzero().flatten()
            coef = x[:, rows] * keep[:, rows]
        matvec = self.qkernels.rows_matvec if quant else self.kernels.rows_matvec
        out = matvec(coef, w.weight_t, rows).to(x.dtype)
        return out if w.bias is None else out + w.bias

    def reglu_sparse(self, x, w: FFNWeights, p: PredictorWeights | None):
        if not self._triton(w.gate) or x.shape[0] != 1 or w.act != "relu":   # the fused kernel: gate > 0
            return super().reglu_sparse(x, w, p)
        t = None if p is None else (x @ p.a)[0]
        out, n_cand, n_active = self.kernels.reglu_ffn(x, w.gate, w.up, w.down_t, t,
                                                       None if p is None else p.b, None if p is None else p.bias)
        # The counts stay on the device (StatsBook reads them when asked), so a decode step
        # never waits for the GPU here.
        return out.to(x.dtype), n_cand, n_active

    def predicted_neurons(self, x, p: PredictorWeights):
        if self.kernels is None or x.shape[0] != 1:
            return super().predicted_neurons(x, p)
        idx = self.kernels.score_compact((x @ p.a)[0], p.b, p.bias)
        return idx.long().sort().values, None
