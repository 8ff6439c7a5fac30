"""Continuous batching: up to N sequences decode together, a new one joins between steps.

``serve --parallel N`` runs its requests through one ``BatchDecoder``.  Each sequence keeps
its own single-sequence KV cache, sized to its prompt and token budget when it joins, and
is prefilled alone exactly as a lone request is.  A decode step then runs every running
sequence's next token through ``DecoderModel.decode_rows``: each projection and FFN once
for all of them (each weight matrix streams once per step instead of once per sequence:
decode is bound by those bytes) and attention per sequence over its own cache with the
single-sequence op.  On the cpu backend every op of that step computes each token as the
one-token path does (docs/chat-apps.md says where it may differ), so a request's greedy
tokens do not depend on what else is running.

Whether that batched step pays is measured, not assumed.  On the cpu backend with block
weights it is one native call (``Executor.decode_layers_rows``) whose GEMMs share each weight
block's unpacking across four tokens, and it wins (SmolLM2 Q4_1, 4 sequences: 7.8 vs 17.5 ms);
composed from executor ops it lost to B native single steps (27.8 vs 23.6 ms), and other
backends, formats or machines may differ.  So for each batch size the first steps alternate
between the two strategies, ``rows`` (``decode_rows``) and ``each`` (the single-sequence step
per sequence), and the faster by median time per step is kept."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from .engine import Engine, TextStream, _Row, sampler
from .errors import InvalidOptionError
from .sampling import SamplingParams, sample


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    row: _Row
    text: TextStream
    gen: torch.Generator | None
    stop_ids: set
    cache: object          # the sequence's own KVCache
    pending: int           # the last sampled token, fed at the next step

    @property
    def finished(self) -> bool:
        return self.row.done is not None or len(self.row.ids) >= self.params.max_new_tokens

    @property
    def position(self) -> int:
        return self.cache.length


STRATEGIES = ("rows", "each")
PROBE_STEPS = 3   # timed steps of each strategy per batch size before one is kept


@dataclass
class StepChoice:
    """Per batch size: the strategy kept (None while probing) and the probe timings (s)."""
    times: dict = field(default_factory=lambda: {k: [] for k in STRATEGIES})
    chosen: str | None = None

    def next(self) -> str:
        if self.chosen is None:
            return min(STRATEGIES, key=lambda k: len(self.times[k]))   # alternate while probing
        return self.chosen

    def record(self, strategy: str, seconds: float) -> None:
        if self.chosen is None:
            self.times[strategy].append(seconds)
            if all(len(v) >= PROBE_STEPS for v in self.times.values()):
                self.chosen = min(STRATEGIES, key=lambda k: statistics.median(self.times[k]))


class BatchDecoder:
    """Up to ``slots`` sequences decoding together."""

    def __init__(self, engine: Engine, slots: int, strategy: str | None = None):
        if not isinstance(slots, int) or slots < 1:
            raise InvalidOptionError(f"parallel slots must be at least 1, got {slots}")
        if strategy not in (None, *STRATEGIES):
            raise InvalidOptionError(f"batch step strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.engine, self.model, self.slots = engine, engine.model, slots
        self.seqs: list[Sequence | None] = [None] * slots
        self.strategy = strategy          # None: measured per batch size (``choices``)
        self.choices: dict[int, StepChoice] = {}

    def free(self) -> int:
        return sum(s is None for s in self.seqs)

    @torch.inference_mode()
    def admit(self, prompt: list[int], params: SamplingParams, slot: int | None = None) -> int:
        """Prefill ``prompt`` alone into a cache of its own, put it in row ``slot`` (a free one;
        default: the first) and sample its first token; returns the row."""
        m, n = self.model, self.engine.check_fits([prompt], params)
        slot = self.seqs.index(None) if slot is None else slot
        if self.seqs[slot] is not None:
            raise ValueError(f"row {slot} is taken")
        dev = m.ex.device
        cache = m.new_cache(1, n + params.max_new_tokens)
        logits = m.forward(torch.tensor([prompt], device=dev), cache, torch.arange(n, device=dev)[None])
        seq = Sequence(list(prompt), params, _Row(n), TextStream(self.engine, params), sampler(params),
                       set(self.engine._stop_ids(params)), cache, 0)
        self._take(seq, logits)
        self.seqs[slot] = seq
        return slot

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One decode step of every running, unfinished row; returns the rows that got a token."""
        live = [i for i, s in enumerate(self.seqs) if s is not None and not s.finished]
        if not live:
            return []
        seqs = [self.seqs[i] for i in live]
        if len(seqs) == 1:   # alone: the single-sequence step (the native layer step where it runs)
            logits = self._single(seqs[0])
        else:
            choice = self.choices.setdefault(len(seqs), StepChoice())
            strategy = self.strategy or choice.next()
            probing = self.strategy is None and choice.chosen is None
            t0 = time.perf_counter()
            if strategy == "each":
                logits = torch.cat([self._single(s) for s in seqs])
            else:
                logits = self.model.decode_rows([s.pending for s in seqs], [s.cache for s in seqs],
                                                [s.position for s in seqs])
            if probing:   # only probe steps are timed: a device sync per step would stall the queue
                self.model.ex.synchronize()
                choice.record(strategy, time.perf_counter() - t0)
        for j, s in enumerate(seqs):
            self._take(s, logits[j:j + 1])
        return live

    def _single(self, s: Sequence) -> torch.Tensor:
        dev = self.model.ex.device
        return self.model.forward(torch.tensor([[s.pending]], device=dev), s.cache,
                                  torch.tensor([[s.position]], device=dev))

    def release(self, slot: int) -> None:
        self.seqs[slot] = None

    def _take(self, s: Sequence, logits: torch.Tensor) -> None:
        seen = [s.prompt + s.row.ids] if s.params.repetition_penalty != 1 else None
        t = int(sample(logits, s.params, s.gen, seen)[0])
        self.engine.accept(s.row, t, s.params, s.stop_ids)
        s.pending = t
