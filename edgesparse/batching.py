"""Continuous batching: up to N sequences decode together, a new one joins between steps.

``serve --parallel N`` runs its requests through one ``BatchDecoder``.  Each sequence keeps
its own single-sequence KV cache, sized to its prompt and token budget when it joins, and
is prefilled alone exactly as a lone request is.  A decode step then runs every running
sequence's next token through ``DecoderModel.decode_rows``: each projection and FFN once
for all of them (each weight matrix streams once per step instead of once per sequence:
decode is bound by those bytes) and attention per sequence over its own cache with the
single-sequence op.  On the cpu backend every op of that step computes each token as the
one-token path does (docs/chat-apps.md says where it may differ), so a request's greedy
tokens do not depend on what else is running."""
from __future__ import annotations

from dataclasses import dataclass

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


class BatchDecoder:
    """Up to ``slots`` sequences decoding together."""

    def __init__(self, engine: Engine, slots: int):
        if not isinstance(slots, int) or slots < 1:
            raise InvalidOptionError(f"parallel slots must be at least 1, got {slots}")
        self.engine, self.model, self.slots = engine, engine.model, slots
        self.seqs: list[Sequence | None] = [None] * slots

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
            s = seqs[0]
            dev = self.model.ex.device
            logits = self.model.forward(torch.tensor([[s.pending]], device=dev), s.cache,
                                        torch.tensor([[s.position]], device=dev))
        else:
            logits = self.model.decode_rows([s.pending for s in seqs], [s.cache for s in seqs],
                                            [s.position for s in seqs])
        for j, s in enumerate(seqs):
            self._take(s, logits[j:j + 1])
        return live

    def release(self, slot: int) -> None:
        self.seqs[slot] = None

    def _take(self, s: Sequence, logits: torch.Tensor) -> None:
        seen = [s.prompt + s.row.ids] if s.params.repetition_penalty != 1 else None
        t = int(sample(logits, s.params, s.gen, seen)[0])
        self.engine.accept(s.row, t, s.params, s.stop_ids)
        s.pending = t
