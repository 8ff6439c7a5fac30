"""Named taps: observe a decoder's intermediate tensors from outside its ``forward``.

Calibration needs each layer's normed block inputs (``layers.{i}.attn_in`` and
``layers.{i}.mlp_in``).  Rather than hooks inside the model, ``observe`` gives the model an
executor proxy for the duration of a block: every RMSNorm whose weight is a known tap
reports its output under the tap's name, like llama.cpp's imatrix tool reads named graph
tensors through an eval callback.  The model code has no calibration branch at all."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch


def tap_names(model) -> dict[int, str]:
    """``id(norm weight) -> tap name`` for every layer's attention and MLP input."""
    out = {}
    for i, layer in enumerate(model.layers):
        out[id(layer.attn.norm)] = f"layers.{i}.attn_in"
        out[id(layer.mlp.norm)] = f"layers.{i}.mlp_in"
    return out


class _TappedExecutor:
    """Delegates to the real executor; reports the outputs of tapped RMSNorms."""

    def __init__(self, ex, names: dict[int, str], fn: Callable[[str, torch.Tensor], None]):
        self._ex, self._names, self._fn = ex, names, fn

    def __getattr__(self, name):
        return getattr(self._ex, name)

    def decode_layer(self, *args):
        return None   # a fused layer would hide its norms from the taps: compose it

    def rms_norm(self, x, weight, eps):
        out = self._ex.rms_norm(x, weight, eps)
        name = self._names.get(id(weight))
        if name is not None:
            self._fn(name, out)
        return out


@contextmanager
def observe(model, fn: Callable[[str, torch.Tensor], None]):
    """Call ``fn(tap_name, tensor)`` for every tapped tensor the model computes in the block."""
    real = model.ex
    model.ex = _TappedExecutor(real, tap_names(model), fn)
    try:
        yield model
    finally:
        model.ex = real
