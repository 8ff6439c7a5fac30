"""What edgesparse needs to know about a checkpoint's architecture, read from its HF config."""
from __future__ import annotations

from dataclasses import dataclass

from edgesparse.errors import UnsupportedModelError

from .families import Family, family_of_config

ACTIVATIONS = {"relu": "relu", "silu": "silu", "swish": "silu"}


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    act: str
    tied: bool
    qkv_bias: bool
    o_bias: bool
    sliding_window: int | None
    max_positions: int

    @property
    def is_reglu(self) -> bool:
        return self.act == "relu"


def spec_from_config(config, family: Family | None = None) -> ModelSpec:
    """The decoder's spec: the Llama-layout settings every family shares, then the family's
    own rules (biases, sliding window, settings it refuses)."""
    family = family or family_of_config(config)
    act = ACTIVATIONS.get(getattr(config, "hidden_act", None))
    if act is None:
        raise UnsupportedModelError(f"unsupported FFN activation {config.hidden_act!r}; expected relu or silu")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) == "dynamic":
        raise UnsupportedModelError("dynamic-NTK RoPE scaling is not supported (it changes with length)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError("FFN biases (mlp_bias=True) are not supported")
    n_heads = config.num_attention_heads
    bias = bool(getattr(config, "attention_bias", False))
    fields = dict(
        family=family.name, vocab_size=config.vocab_size, hidden=config.hidden_size,
        intermediate=config.intermediate_size, n_layers=config.num_hidden_layers, n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        eps=config.rms_norm_eps, act=act, tied=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=bias, o_bias=bias, sliding_window=None, max_positions=config.max_position_embeddings)
    fields.update(family.rules(config))
    return ModelSpec(**fields)
