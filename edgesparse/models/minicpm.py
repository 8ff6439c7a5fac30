"""MiniCPM (``MiniCPMForCausalLM``; MiniCPM-S / ProSparse with FATReLU): the Llama layout with
three scalings, folded into the weights at load so the shared decoder runs it unchanged.

The published forward: the embedding is multiplied by ``scale_emb``; each residual branch
(attention and MLP output) by ``scale_depth / sqrt(num_hidden_layers)``; the final normed
hidden state is divided by ``hidden_size / dim_model_base`` before the head.  Folded, exactly
in real arithmetic: the residual stream is carried divided by ``scale_emb`` (so the embedding
is used as stored, and tied heads stay tied), which scales every branch output by
``scale_depth / sqrt(L) / scale_emb`` (folded into ``o_proj`` and ``down_proj``) and every
RMSNorm input by ``1 / scale_emb`` (RMSNorm is scale-free but for its epsilon, which becomes
``eps / scale_emb²``); the head's divisor goes into the final norm's weight."""
from __future__ import annotations

import functools
import math

import torch

from edgesparse.errors import UnsupportedModelError

from .families import Family

SCALES = ("scale_emb", "scale_depth", "dim_model_base")


def _scales(config) -> dict[str, float]:
    out = {}
    for key in SCALES:
        v = getattr(config, key, None)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise UnsupportedModelError(f"MiniCPM config needs {key}, a positive number; it has {v!r}")
        out[key] = float(v)
    return out


def _rules(config) -> dict:
    if getattr(config, "num_experts", 0):
        raise UnsupportedModelError("MiniCPM mixture-of-experts checkpoints are not supported")
    s = _scales(config)
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise UnsupportedModelError(f"MiniCPM config rms_norm_eps = {eps!r}: expected a number")
    # MiniCPM's config class ties the head to the embedding unless told otherwise
    return dict(eps=eps / s["scale_emb"] ** 2, tied=bool(getattr(config, "tie_word_embeddings", True)))


@functools.lru_cache(maxsize=8)
def _branch_names(n_layers: int) -> frozenset[str]:
    """The checkpoint names of every residual branch's output projection (weights, biases)."""
    names = FAMILY.tensors
    return frozenset(template.format(i=i).replace("weight", kind) for i in range(n_layers)
                     for template in (names.o, names.down) for kind in ("weight", "bias"))


def _fold(name: str, t, config, spec):
    """One checkpoint tensor as the shared decoder needs it: o_proj and down_proj (and their
    biases) times ``scale_depth / sqrt(L) / scale_emb``, the final norm's weight times
    ``dim_model_base / hidden_size``; every other tensor as it is."""
    from edgesparse.errors import ModelFilesError
    s = _scales(config)
    names = FAMILY.tensors
    if name in _branch_names(spec.n_layers):
        scale = s["scale_depth"] / math.sqrt(spec.n_layers) / s["scale_emb"]
    elif name == names.norm:
        scale = s["dim_model_base"] / spec.hidden
    else:
        return t
    if not isinstance(t, torch.Tensor):
        raise ModelFilesError(f"MiniCPM weight {name} is not a float tensor (MiniCPM is read from float checkpoints)")
    return (t.double() * scale).to(t.dtype)


FAMILY = Family(name="minicpm", rules=_rules, fold=_fold, plain_config=True)
