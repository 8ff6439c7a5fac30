"""The decode engine: static KV cache, prefill then token-by-token decode, streaming.

``Engine.generate`` takes a batch of prompts; ``Engine.stream`` yields text as it is decoded.
One pre-allocated cache per call; prompts are left-padded so every row decodes at the same
cache slot."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import EmptyDataError, InvalidOptionError
from .sampling import SamplingParams, sample


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str         # "stop" | "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        n = max(len(self.token_ids) - 1, 0)  # the first token comes from prefill
        return n / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class _Row:
    prompt_len: int
    ids: list[int] = field(default_factory=list)
    done: str | None = None


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tok = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])

    # -- public API ---------------------------------------------------------------------------
    def encode(self, prompt: str, tokenizer=None) -> list[int]:
        """Token ids of ``prompt``; ``tokenizer``: a copy of this engine's tokenizer, for a
        caller on another thread (HF fast tokenizers must not be used by two threads at once)."""
        if not isinstance(prompt, str) or prompt == "":
            raise EmptyDataError("the prompt is empty")
        ids = (tokenizer or self.tok)(prompt, add_special_tokens=True)["input_ids"]
        return ids or [self.eos_ids[0]]

    def generate(self, prompts: str | list[str], params: SamplingParams | None = None, **kw):
        """Complete one prompt (returns a Completion) or a list (returns a list)."""
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise EmptyDataError("no prompts given")
        params = (params or SamplingParams(**kw)).validate()
        outs = self.generate_ids([self.encode(p) for p in batch], params)
        return outs[0] if single else outs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, on_finish=None,
               on_step=None, **kw) -> Iterator[str]:
        """Yield the completion text piece by piece as tokens are decoded.  ``prompt``: text or
        token ids. ``on_finish`` (if given) receives ``{finish_reason, completion_tokens}`` after
        the last piece; ``on_step`` is called after every decoded token (it may raise to stop)."""
        params = (params or SamplingParams(**kw)).validate()
        prompt_ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt)
        row = _Row(len(prompt_ids))
        text = TextStream(self, params)
        for _ in self._decode([prompt_ids], params, [row]):
            if on_step is not None:
                on_step()
            piece = text.piece(row.ids)
            if piece:
                yield piece
        piece = text.piece(row.ids, final=True)
        if piece:
            yield piece
        if on_finish is not None:
            on_finish(dict(finish_reason=row.done or "length", completion_tokens=len(row.ids)))

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        rows = [_Row(len(p)) for p in prompt_ids]
        t0 = time.perf_counter()
        t_first = None
        for step in self._decode(prompt_ids, params, rows):
            if t_first is None:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        out = []
        for r in rows:
            text = self._visible(r.ids, params)
            out.append(Completion(text=text, token_ids=r.ids, prompt_tokens=r.prompt_len,
                                  finish_reason=r.done or "length", prefill_s=(t_first or t_end) - t0,
                                  decode_s=t_end - (t_first or t_end)))
        return out

    def accept(self, row: "_Row", t: int, params: SamplingParams, stop_ids: set) -> None:
        """Record token ``t`` on ``row`` and mark the row done on a stop token or stop string."""
        row.ids.append(t)
        if t in stop_ids:
            row.done = "stop"
        elif params.stop:
            tail = self.tok.decode(row.ids[-16:])
            if any(s and s in tail for s in params.stop):
                row.done = "stop"

    def check_fits(self, prompt_ids: list[list[int]], params: SamplingParams) -> int:
        """The longest prompt's length, once every prompt has a token and fits the context
        with ``max_new_tokens`` after it."""
        if any(len(p) == 0 for p in prompt_ids):
            raise EmptyDataError("a prompt encodes to no tokens")
        longest, ctx = max(len(p) for p in prompt_ids), self.model.spec.max_positions
        if longest + params.max_new_tokens > ctx:
            raise InvalidOptionError(f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) "
                                     f"exceeds the model's context of {ctx}")
        return longest

    # -- internals ----------------------------------------------------------------------------
    def _visible(self, ids: list[int], params: SamplingParams) -> str:
        stop_ids = set(self._stop_ids(params))
        keep = ids[:-1] if ids and ids[-1] in stop_ids else ids
        text = self.tok.decode(keep, skip_special_tokens=True)
        return _cut_at_stop(text, params.stop)

    def _stop_ids(self, params):
        return self.eos_ids if params.stop_token_ids is None else params.stop_token_ids

    @torch.inference_mode()
    def _decode(self, prompt_ids, params, rows=None) -> Iterator[list[int]]:
        """Yields, per step, the token sampled for every row (a finished row's tokens are
        sampled but no longer recorded)."""
        m = self.model
        rows = rows if rows is not None else [_Row(len(p)) for p in prompt_ids]
        B, L = len(prompt_ids), self.check_fits(prompt_ids, params)
        total = L + params.max_new_tokens
        dev = m.ex.device
        pad = self.eos_ids[0] if self.eos_ids else 0
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompt_ids], device=dev)
        valid = torch.tensor([[False] * (L - len(p)) + [True] * len(p) for p in prompt_ids], device=dev)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        cache = m.new_cache(B, total)
        gen = sampler(params)
        stop_ids = set(self._stop_ids(params))
        logits = m.forward(ids, cache, pos, valid)
        next_pos = pos[:, -1:] + 1
        for _ in range(params.max_new_tokens):
            # the repetition penalty's history: each prompt and what its row has recorded
            seen = ([p + r.ids for p, r in zip(prompt_ids, rows)] if params.repetition_penalty != 1 else None)
            tok = sample(logits, params, gen, seen).tolist()
            for r, t in zip(rows, tok):
                if r.done is None:
                    self.accept(r, t, params, stop_ids)
            yield tok
            if all(r.done for r in rows):
                return
            logits = m.forward(torch.tensor(tok, device=dev)[:, None], cache, next_pos)
            next_pos = next_pos + 1


def sampler(params: SamplingParams) -> torch.Generator | None:
    """The random generator of one request: seeded by ``params.seed``, or at random; None
    when decoding is greedy."""
    if params.temperature <= 0:
        return None
    return torch.Generator().manual_seed(params.seed if params.seed is not None else
                                         int(torch.randint(0, 2**31, (1,))))


class TextStream:
    """The text of one sequence as its tokens arrive, in pieces safe to send: an incomplete
    UTF-8 sequence and a possible stop-string prefix are held back until resolved."""

    def __init__(self, engine: Engine, params: SamplingParams):
        self.engine, self.params, self.sent = engine, params, ""

    def piece(self, ids: list[int], final: bool = False) -> str:
        text = self.engine._visible(ids, self.params)
        if not final:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - _stop_prefix_len(text, self.params.stop)]
        if len(text) <= len(self.sent):
            return ""
        out, self.sent = text[len(self.sent):], text
        return out


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
