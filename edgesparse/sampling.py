"""Sampling options and next-token selection (greedy / temperature / top-k / top-p / min-p,
repetition penalty, seeded)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InvalidOptionError

SEED_RANGE = range(-(2**63), 2**64)   # what torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0                # drop tokens below min_p x the top token's probability; 0 = off
    repetition_penalty: float = 1.0   # > 1 discourages tokens already in the prompt or output (CTRL's rule)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)   # stop strings (not included in the text)
    stop_token_ids: list[int] | None = None          # None = the model's EOS tokens

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidOptionError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0 <= self.temperature <= 100:
            raise InvalidOptionError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidOptionError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidOptionError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise InvalidOptionError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty <= 10:
            raise InvalidOptionError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed not in SEED_RANGE):
            raise InvalidOptionError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        return self


# What `chat` (and the server's chat route) use when the checkpoint has no generation config:
# llama.cpp's min_p 0.05 prunes the long tail that a 0.7 temperature lets small models wander
# into, and a mild repetition penalty breaks the phrase loops SmolLM2-135M fell into without it.
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1}
_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def checkpoint_defaults(model_dir) -> dict:
    """The sampling fields a checkpoint's ``generation_config.json`` sets, as transformers reads
    them: ``do_sample: false`` means greedy whatever the temperature.  {} without the file."""
    import json
    from pathlib import Path

    from .errors import ModelFilesError
    f = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if f is None or not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ModelFilesError(f"{f}: not a readable generation config ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFilesError(f"{f}: not a JSON object")
    out = {k: cfg[k] for k in _CONFIG_FIELDS if isinstance(cfg.get(k), (int, float)) and not isinstance(cfg[k], bool)}
    if cfg.get("do_sample") is False:
        out = {k: v for k, v in out.items() if k == "repetition_penalty"}
        out["temperature"] = 0.0
    try:
        SamplingParams(**out).validate()
    except InvalidOptionError as e:
        raise ModelFilesError(f"{f}: {e}") from None
    return out


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None,
           seen: list[list[int]] | None = None) -> torch.Tensor:
    """Next token for each row of ``logits [B, V]`` -> ``[B]``; ``seen[b]``: row b's prompt and
    output so far (for the repetition penalty)."""
    if p.repetition_penalty != 1 and seen is not None:
        logits = logits.float().clone()
        for b, ids in enumerate(seen):   # as transformers: divide positive logits, multiply negative
            if ids:
                idx = torch.tensor(sorted(set(ids)), device=logits.device)
                v = logits[b, idx]
                logits[b, idx] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if p.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        srt, order = logits.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > p.top_p   # keep the smallest prefix reaching top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, srt)
    probs = logits.softmax(-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), 0.0)
    # Sample on the CPU generator so a seed gives the same text on every backend.
    return torch.multinomial(probs.cpu(), 1, generator=gen).flatten().to(logits.device)
