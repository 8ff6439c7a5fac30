"""Model families: what differs between checkpoints that share the Llama decoder layout.

A family is one module under ``edgesparse/models/`` that defines ``FAMILY``: its checkpoint
tensor names (safetensors and GGUF) and its config rules.  RoPE comes from the config's
``rope_type`` through transformers' initialisers, the same for every family.  The
registry maps HF architecture names to those modules and imports them on first use, so
adding a family is one module plus one line here, or ``register_family`` from outside."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from edgesparse.errors import InvalidOptionError, UnsupportedModelError


@dataclass(frozen=True)
class TensorNames:
    """Checkpoint names of a decoder's weights; ``{i}`` is the layer index.  Biases, where a
    family has them, are the weight's name with ``weight`` replaced by ``bias``."""
    embed: str = "model.embed_tokens.weight"
    norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    attn_norm: str = "model.layers.{i}.input_layernorm.weight"
    q: str = "model.layers.{i}.self_attn.q_proj.weight"
    k: str = "model.layers.{i}.self_attn.k_proj.weight"
    v: str = "model.layers.{i}.self_attn.v_proj.weight"
    o: str = "model.layers.{i}.self_attn.o_proj.weight"
    mlp_norm: str = "model.layers.{i}.post_attention_layernorm.weight"
    gate: str = "model.layers.{i}.mlp.gate_proj.weight"
    up: str = "model.layers.{i}.mlp.up_proj.weight"
    down: str = "model.layers.{i}.mlp.down_proj.weight"


# The names llama.cpp's converter gives the same tensors in a GGUF file.
GGUF_NAMES = TensorNames(
    embed="token_embd.weight", norm="output_norm.weight", lm_head="output.weight",
    attn_norm="blk.{i}.attn_norm.weight", q="blk.{i}.attn_q.weight", k="blk.{i}.attn_k.weight",
    v="blk.{i}.attn_v.weight", o="blk.{i}.attn_output.weight", mlp_norm="blk.{i}.ffn_norm.weight",
    gate="blk.{i}.ffn_gate.weight", up="blk.{i}.ffn_up.weight", down="blk.{i}.ffn_down.weight")


def _no_rules(config) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    name: str                 # what ModelSpec.family reads, e.g. "llama"
    tensors: TensorNames = field(default_factory=TensorNames)
    # config -> ModelSpec fields that differ from the Llama defaults (biases, sliding window);
    # raises UnsupportedModelError for settings the decoder does not implement
    rules: Callable[[object], dict] = _no_rules
    gguf_tensors: TensorNames = GGUF_NAMES
    # llama.cpp's converter reorders the rows of q and k of Llama-style checkpoints (RoPE on
    # interleaved pairs); the reader undoes it.  Families with NeoX-style RoPE keep them as is.
    gguf_permuted_qk: bool = True
    # (checkpoint name, tensor, config, spec) -> the tensor the shared Llama decoder needs to
    # compute this family's forward (MiniCPM folds its three scalings in); applied to every
    # tensor read from the checkpoint, at load and when a float source reads it back later
    fold: Callable[[str, object, object, object], object] | None = None
    # the config is read from config.json as plain data: the family's own config class lives in
    # the checkpoint's remote code, which edgesparse never runs
    plain_config: bool = False


_REGISTRY: dict[str, "Family | str"] = {
    "LlamaForCausalLM": "edgesparse.models.llama",
    "MistralForCausalLM": "edgesparse.models.mistral",
    "Qwen2ForCausalLM": "edgesparse.models.qwen2",
    "MiniCPMForCausalLM": "edgesparse.models.minicpm",
}


def register_family(architecture: str, family: Family | str) -> None:
    """Add (or replace) the family of an HF architecture name: a Family, or the name of a
    module that defines ``FAMILY``."""
    if not isinstance(family, (Family, str)) or not architecture:
        raise InvalidOptionError(f"register_family() takes an architecture name and a Family, got {family!r}")
    _REGISTRY[architecture] = family


def architectures() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _resolve(architecture: str) -> Family:
    fam = _REGISTRY[architecture]
    if isinstance(fam, str):
        fam = _REGISTRY[architecture] = importlib.import_module(fam).FAMILY
    return fam


def family_of(archs: list[str] | None, model_type: str | None = None) -> Family:
    """The family of a checkpoint from its config's ``architectures`` (or, when it lists none,
    the ``model_type`` of a registered family)."""
    for a in archs or []:
        if a in _REGISTRY:
            return _resolve(a)
    if not archs and model_type:
        for a in _REGISTRY:
            if _resolve(a).name == model_type:
                return _resolve(a)
    got = ", ".join(archs or []) or model_type or "?"
    raise UnsupportedModelError(f"unsupported architecture {got}; edgesparse runs {', '.join(_REGISTRY)}")


def family_of_config(config) -> Family:
    """``family_of`` for a transformers config object."""
    return family_of(list(getattr(config, "architectures", None) or []), getattr(config, "model_type", None))
