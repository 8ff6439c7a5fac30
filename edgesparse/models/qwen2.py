"""Qwen2: the Llama layout with q/k/v biases (and no o_proj bias)."""
from __future__ import annotations

from edgesparse.errors import UnsupportedModelError

from .families import Family


def _rules(config) -> dict:
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedModelError("Qwen2 with use_sliding_window=True is not supported")
    return dict(qkv_bias=True, o_bias=False)


FAMILY = Family(name="qwen2", rules=_rules, gguf_permuted_qk=False)
