"""The FFN of one decoder layer inside vLLM, run by the edgesparse executor.

vLLM flattens a scheduler step into one token axis: the decode tokens of running requests and
the prompt chunks of new ones, side by side.  Each step gets a ``StepPlan`` (built once per
forward from vLLM's attention metadata, shared by every layer) saying which token rows are
decode rows: a request contributing exactly one token.  Every other row runs the dense FFN
(a prompt activates most neurons in the union anyway), as edgesparse's own engine does.

Decode rows run in the layer's calibrated mode:

* one row: ``Executor.reglu_sparse`` (the cpu backend's native one-token kernel), exactly what
  edgesparse's own engine runs for a single chat;
* several rows: the predictor's candidates of every row, united (``Executor.predicted_neurons``);
  each row keeps only its own candidates (``own``), so a row's output is its output alone.  The
  union grows with the batch; when it exceeds ``break_even`` of the layer's neurons, gathering
  reads more than the dense FFN, and the layer runs densely for this step.  That fallback is
  counted (``BatchCounters``) and logged, never silent.

The weights live in the edgesparse layouts (``FFNWeights``: gate, up and W_down transposed,
``[d_ff, d]`` each) as the executor prepared them; the parameters vLLM loads into are the
same tensors."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from edgesparse.errors import InvalidOptionError
from edgesparse.models.weights import ReGLUMLP, gated_mlp
from edgesparse.sparsity.ffn import StatsBook, record_gather

# Share of a layer's neurons above which a decode batch's candidate union runs the dense FFN
# instead of gathering.  Measured on the 2-core dev CPU, TinyLlama's FFN shape, bf16, through
# vLLM (bench/vllm_concurrency.py, bench/results/vllm_concurrency_tinyllama.json): at a mean
# union of 0.35 the union path decoded 24-25 tok/s against 17 dense, at 0.50 24 against 30-32.
# (The FFN alone, bench/vllm_break_even.py, crosses later, near 0.6-0.7: the end-to-end figure
# includes the predictor and the per-step index work.)  Override with the hf-override key
# ``edgesparse_union_break_even``; other machines and devices have other break-evens.
UNION_BREAK_EVEN = 0.45
FFN_MODES = ("dense", "exact", "predictor")


@dataclass
class StepPlan:
    """Which rows of this forward step are decode rows (``None``: all rows; an empty tensor:
    none).  Built by the model once per forward and read by every layer's MLP."""
    decode_rows: torch.Tensor | None = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    all_decode: bool = False


@dataclass
class BatchCounters:
    """Layer calls per path, summed over layers, plus the tokens each path saw."""
    single: int = 0      # one decode token: the executor's one-token sparse FFN
    union: int = 0       # several decode tokens, candidate union <= break-even: sparse
    fallback: int = 0    # several decode tokens, union > break-even: dense (counted, logged)
    prefill: int = 0     # calls with prompt rows (those rows dense)
    dense: int = 0       # decode rows of a layer (or model) that runs densely by its mode
    union_tokens: int = 0
    fallback_tokens: int = 0
    union_share_sum: float = 0.0   # sum over union/fallback calls of |union| / d_ff

    def as_dict(self) -> dict:
        n = self.union + self.fallback
        return dict(vars(self), mean_union_share=round(self.union_share_sum / n, 4) if n else None)


class EdgeSparseMLP(nn.Module):
    """A gated FFN (ReGLU or SwiGLU) whose weights are edgesparse's and whose arithmetic is
    the executor's.  ``model`` is the owning model's ``Runtime`` (executor, plan, counters,
    mode), shared by all layers."""

    def __init__(self, hidden: int, intermediate: int, act: str, index: int, runtime: "Runtime",
                 threshold: float = 0.0):
        super().__init__()
        dtype = torch.get_default_dtype()   # vLLM builds the model under its dtype and device
        # Names vLLM's loader reaches (see load_weights); down_t holds W_down transposed.
        self.gate = nn.Parameter(torch.empty(intermediate, hidden, dtype=dtype), requires_grad=False)
        self.up = nn.Parameter(torch.empty(intermediate, hidden, dtype=dtype), requires_grad=False)
        self.down_t = nn.Parameter(torch.empty(intermediate, hidden, dtype=dtype), requires_grad=False)
        self.act, self.threshold, self.index, self.runtime = act, threshold, index, runtime
        self.es = None   # the edgesparse MLP (GatedMLP / ReGLUMLP), built by finish_loading

    def load_weights(self, weights) -> set[str]:
        """Checkpoint tensors after vLLM's Llama name mapping: ``gate_up_proj.weight`` twice
        (shard 0 gate, 1 up) and ``down_proj.weight`` (``W_down [d, d_ff]``)."""
        loaded = set()
        for name, w in weights:
            if name == "gate_up_proj.weight":
                shard = getattr(w, "shard_id", None)
                target = {0: self.gate, 1: self.up}.get(shard)
                if target is None:
                    raise ValueError(f"unexpected shard {shard!r} for {name}")
            elif name == "down_proj.weight":
                target, w = self.down_t, w.t()
            else:
                raise ValueError(f"unexpected MLP weight {name}")
            target.data.copy_(w)
            loaded.add({id(self.gate): "gate", id(self.up): "up", id(self.down_t): "down_t"}[id(target)])
        return loaded

    def finish_loading(self, norm: torch.Tensor) -> None:
        """Hand the loaded matrices to the executor (``weights.gated_mlp``: the layouts it
        streams; ReGLU layers get the type that can run sparse) and point the parameters at
        the prepared tensors, so the weights are held once."""
        ex = self.runtime.ex
        self.es = gated_mlp(ex, norm, self.gate.data, self.up.data, self.down_t.data.t(), self.act, self.threshold)
        ffn = self.es.ffn
        for p, t in ((self.gate, ffn.gate), (self.up, ffn.up), (self.down_t, ffn.down_t)):
            if isinstance(t, torch.Tensor):
                p.data = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        plan = rt.plan
        mode = self.es.effective_mode(rt.mode) if isinstance(self.es, ReGLUMLP) else "dense"
        if plan.all_decode:
            return self._decode(x, mode)
        out = rt.ex.ffn_dense(x, self.es.ffn)   # prompt rows (and any others) dense
        rows = plan.decode_rows
        rt.counters.prefill += 1
        if rows is not None and rows.numel():
            out[rows] = self._decode(x[rows], mode)
        return out

    def _decode(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        rt, ex, es = self.runtime, self.runtime.ex, self.es
        c, n, d_ff = rt.counters, x.shape[0], es.ffn.gate.shape[0]
        stats = rt.stats.layer(self.index)
        if mode == "dense" or n == 0:
            c.dense += 1
            return ex.ffn_dense(x, es.ffn)
        if n == 1 or mode == "exact":
            # One token (or exact mode, whose gate is dense anyway): the executor's own op.
            out, gate_rows, active = ex.reglu_sparse(x, es.ffn, es.predictor if mode == "predictor" else None)
            record_gather(stats, n, d_ff, gate_rows, active)
            if n == 1:
                c.single += 1
            else:
                c.union += 1
                c.union_tokens += n
            return out
        # A decode batch: the union of the tokens' candidates, each token keeping its own.
        cand, own = ex.predicted_neurons(x, es.predictor)
        share = cand.numel() / d_ff
        c.union_share_sum += share
        if share > rt.break_even:
            c.fallback += 1
            c.fallback_tokens += n
            return ex.ffn_dense(x, es.ffn)
        c.union += 1
        c.union_tokens += n
        # Executor.reglu_sparse's composition, with the candidates already in hand.
        h = es.ffn.act_fn(ex.gate_rows(x, es.ffn, cand)) * own
        keep = ex.nonzero_columns(h > 0)
        record_gather(stats, n, d_ff, cand.numel(), keep.numel())
        return ex.up_down_rows(x, h[:, keep], es.ffn, cand[keep])


class Runtime:
    """What every layer's MLP shares: the executor, this step's plan, the FFN mode, the
    union break-even and the counters."""

    def __init__(self, ex, mode: str = "dense", break_even: float = UNION_BREAK_EVEN):
        if mode not in FFN_MODES:
            raise InvalidOptionError(f"edgesparse_ffn_mode must be one of {', '.join(FFN_MODES)}, got {mode!r}")
        try:
            share = float(break_even)
        except (TypeError, ValueError):
            share = float("nan")
        if not 0.0 <= share <= 1.0:   # NaN fails too
            raise InvalidOptionError(f"edgesparse_union_break_even must be a number in [0, 1], got {break_even!r}")
        self.ex, self.mode, self.break_even = ex, mode, share
        self.plan = StepPlan()
        self.counters = BatchCounters()
        self.stats = StatsBook()
