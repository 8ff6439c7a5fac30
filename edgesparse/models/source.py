"""The float matrices a block-quantised model was made from, read back on demand.

LaRoSA folds an orthogonal rotation into the weights after calibration.  Folded into
weights that are already 4-bit, the result has to be quantised a second time across new
axes, which doubles the error, so those weights are kept at 8 bits (``requantised_format``)
and a token streams twice the bytes.  When the checkpoint's float values are still at hand
(HF safetensors, memory-mapped; the synthetic benchmark model) the rotation is folded into
them instead and the folded matrices are quantised once, to the model's own format.  A GGUF
file has no float copy: its folds keep the 8-bit rule."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from edgesparse.errors import ModelFilesError
from .families import TensorNames


class FloatSource:
    """``get(name)``: one checkpoint tensor (any float dtype) by its checkpoint name."""

    def __init__(self, get: Callable[[str], torch.Tensor], names: TensorNames):
        self.get, self.names = get, names

    @classmethod
    def from_safetensors(cls, files: list[Path], names: TensorNames) -> "FloatSource":
        """Tensors read lazily from ``files``: each call maps one tensor, nothing stays resident."""
        from safetensors import SafetensorError, safe_open
        where = {}
        for f in files:
            with safe_open(str(f), "pt") as fh:
                where.update({k: f for k in fh.keys()})

        def get(name):
            if name not in where:
                raise KeyError(name)
            try:
                with safe_open(str(where[name]), "pt") as fh:
                    return fh.get_tensor(name)
            except (OSError, SafetensorError) as e:   # the checkpoint changed or went away since load
                raise ModelFilesError(f"cannot re-read {name} from {where[name]}: {str(e).splitlines()[0]}") from e
        return cls(get, names)

    def _t(self, template: str, i: int | None = None) -> torch.Tensor:
        return self.get(template if i is None else template.format(i=i)).double()

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s matrices in float64, laid out as the decoder holds them: ``qkv``
        (q, k, v stacked), ``o``, ``gate``, ``up`` and ``down_t`` (neuron-major)."""
        n = self.names
        return dict(qkv=torch.cat([self._t(n.q, i), self._t(n.k, i), self._t(n.v, i)]), o=self._t(n.o, i),
                    gate=self._t(n.gate, i), up=self._t(n.up, i), down_t=self._t(n.down, i).T)

    def embed(self) -> torch.Tensor:
        return self._t(self.names.embed)

    def lm_head(self) -> torch.Tensor:
        """The output matrix (a tied checkpoint's embedding: under block formats the decoder
        holds its own 8-bit copy, so the two are folded separately)."""
        try:
            return self._t(self.names.lm_head)
        except KeyError:
            return self.embed()
