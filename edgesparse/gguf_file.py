"""GGUF weights read straight from the file, without transformers' fp32 model.

The file is memory-mapped (``gguf.GGUFReader``) and read tensor by tensor:
* Q8_0 / Q4_0 / Q4_1 blocks are the runtime's q8_0 / q4_0 / q4_1 byte for byte (fp16 scale,
  [fp16 minimum,] then the quants, blocks along each row), so matrices whose rows are the rows the kernels stream
  (q, k, v, o, gate, up, embeddings, lm_head) are copied as they are: no float round trip.
* The down projection is streamed neuron-major (``W_downᵀ``), across the file's blocks: it is
  de-quantised, transposed and quantised again, to q8_0 when the file is 4-bit.  Every other
  type (Q4_1, K-quants, F16, ...) has no runtime twin: those are de-quantised one
  tensor at a time and quantised to the runtime format at once, so peak memory stays near the
  final size.
q and k rows are put back in Hugging Face order (llama.cpp's converter permutes them for its
RoPE), so the decoder and the RoPE tables are the same as for a safetensors checkpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgesparse.backends.formats import QuantRows, TransposedRows, quantizable, quantize_rows, requantised_format
from .errors import ModelFilesError
from .models.spec import checked_tensors
from .gguf_header import GGUFFormatError, parse_header

ADOPTED = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
FLOAT_TYPES = ("F32", "F16", "BF16")
EIGHT_BIT = ("Q8_0", "Q8_1", "Q8_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K")


class _Tensor:
    """One tensor of a GGUF file: its name, type, shape (GGUF order: columns first); ``data``
    reads its bytes from the file (``[rows, row bytes]``; ``[1, n]`` for a vector).  Plain reads,
    not a memory map: mapped pages stay resident while the map lives and would add the whole
    file to the process's peak memory on top of the weights copied out of it."""

    def __init__(self, path, name, qtype, shape, offset, nbytes, rows):
        self.path, self.name, self.tensor_type, self.shape = path, name, qtype, shape
        self.offset, self.nbytes, self.rows = offset, nbytes, rows

    @property
    def data(self) -> np.ndarray:
        return np.fromfile(self.path, dtype=np.uint8, count=self.nbytes, offset=self.offset).reshape(self.rows, -1)


class _Reader:
    """The tensor table of a GGUF file, from its strictly parsed header (``gguf_header``).
    gguf.GGUFReader would also parse every metadata value into numpy views (~4 s for a
    49k-token vocabulary); the loader needs only the tensors (config and tokenizer come from
    transformers, cached)."""

    def __init__(self, path: Path):
        from gguf import GGMLQuantizationType
        self.header = parse_header(path)
        self.tensors = [_Tensor(path, t.name, GGMLQuantizationType(t.type_id), list(t.dims), t.offset,
                                t.nbytes, t.rows) for t in self.header.tensors]


def open_gguf(path: Path):
    """The file's tensor table; a malformed file is a ModelFilesError (one line)."""
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ModelFilesError("reading GGUF needs the 'gguf' package: pip install gguf") from e
    try:
        return _Reader(path)
    except GGUFFormatError as e:
        raise ModelFilesError(f"cannot read GGUF {path}: {e}") from None
    except OSError as e:
        raise ModelFilesError(f"cannot read GGUF {path}: {e.strerror or e}") from None


def check_tensors(reader, family, spec) -> None:
    """Every tensor the model reads is present with the dims its config implies and a type
    the reader can de-quantise, before any of it is read: a file whose tensor table disagrees
    with its own metadata (a crafted or mislabelled file) is refused with one line naming the
    tensor, what was expected and what was found."""
    have = {t.name: t for t in reader.tensors}
    for t in reader.tensors:   # a tensor of a layer the config does not have: a file at odds with itself
        parts = t.name.split(".")
        if len(parts) > 2 and parts[0] == "blk" and (not parts[1].isdigit() or int(parts[1]) >= spec.n_layers):
            raise ModelFilesError(f"GGUF tensor {t.name} is for a layer the config does not have "
                                  f"({spec.n_layers} layers)")
    for name, t in checked_tensors(have, family.gguf_tensors, spec, "GGUF tensor", gguf_order=True):
        typ = t.tensor_type.name
        if len(t.shape) == 1 and typ not in FLOAT_TYPES:
            raise ModelFilesError(f"GGUF tensor {name} is a vector of type {typ}; expected F32, F16 or BF16")
        if typ not in FLOAT_TYPES and typ not in READABLE:
            raise ModelFilesError(f"GGUF tensor {name} has type {typ}, which edgesparse cannot read "
                                  f"(it reads {', '.join(FLOAT_TYPES + READABLE)})")


# de-quantised by gguf.quants (the K-quants, Q5_*, Q8_0 ...); Q4_0/Q4_1/Q8_0 are also kept as blocks
READABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")


def default_format(reader) -> str | None:
    """The file's own precision as a runtime format: the type of most of its matrices, mapped
    to itself where the runtime has it (Q8_0, Q4_0, Q4_1), else q8_0 (8-, 6- and 5-bit types),
    q4_0 (4 bits and below) or None (float files)."""
    types = [t.tensor_type.name for t in reader.tensors if len(t.shape) == 2]
    main = max(set(types), key=types.count) if types else "F32"
    if main in FLOAT_TYPES:
        return None
    if main in ADOPTED:
        return ADOPTED[main]
    return "q8_0" if main in EIGHT_BIT else "q4_0"


def _unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation: the converter wrote HF row
    ``(head, half t, j)`` to file row ``(head, j, t)``; HF row r is file row ``perm[r]``."""
    return torch.arange(n_rows).view(n_head, n_rows // n_head // 2, 2).transpose(1, 2).reshape(-1)


def _float(t) -> torch.Tensor:
    """A tensor de-quantised (or as stored, for float types) as fp32 ``[rows, cols]``."""
    from gguf.quants import dequantize
    typ = t.tensor_type.name
    try:
        if typ == "F32":
            arr = t.data.view(np.float32)
        elif typ == "F16":
            arr = t.data.view(np.float16)
        elif typ == "BF16":
            arr = (t.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ModelFilesError(f"GGUF tensor {t.name} has type {typ}, which edgesparse cannot read "
                              f"(it reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, and the K-quants)") from None
    cols = int(t.shape[0])
    return torch.from_numpy(np.asarray(arr, dtype=np.float32)).reshape(-1, cols)   # fp32 data: no copy


def read_weights(reader, family, spec, fmt: str | None, head_fmt: str | None, dtype) -> dict:
    """HF-named weights: QuantRows for matrices in ``fmt`` (embeddings and lm_head in
    ``head_fmt``), float tensors of ``dtype`` for vectors and for everything when ``fmt`` is
    None.  ``down_proj`` comes back neuron-major (``[d_ff, d]``) when it is a QuantRows."""
    src, dst = family.gguf_tensors, family.tensors
    names = {src.embed: dst.embed, src.norm: dst.norm, src.lm_head: dst.lm_head}
    heads, downs = {}, set()   # q/k (weights and biases) -> their head count; down projections
    for i in range(spec.n_layers):
        for field in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"):
            g, h = getattr(src, field).format(i=i), getattr(dst, field).format(i=i)
            names[g] = h
            names[g.replace("weight", "bias")] = h.replace("weight", "bias")
            if field in ("q", "k"):
                heads[h] = heads[h.replace("weight", "bias")] = spec.n_heads if field == "q" else spec.n_kv_heads
        downs.add(dst.down.format(i=i))
    out = {}
    for t in reader.tensors:
        hf = names.get(t.name)
        if hf is None:        # e.g. rope_freqs: derived from the config instead
            continue
        typ = t.tensor_type.name
        is_down = hf in downs
        # A SwiGLU FFN only runs densely: its down projection keeps the file's row-major blocks
        # (TransposedRows; executors without that kernel re-lay it out at prepare_ffn).  A ReGLU
        # one is read neuron-major for the sparse kernels, re-quantised across its blocks.
        neuron_major = is_down and spec.is_reglu
        want = head_fmt if hf in (dst.embed, dst.lm_head) else fmt
        if neuron_major and typ not in FLOAT_TYPES:
            want = requantised_format(want)
        if len(t.shape) == 1:
            val = _float(t).reshape(-1).to(dtype)
        elif want is not None and ADOPTED.get(typ) == want and not neuron_major:
            rows = int(t.shape[1])
            data = torch.from_numpy(t.data).reshape(rows, -1)
            val = QuantRows(want, data, int(t.shape[0]))
        else:
            m = _float(t)
            rows = m.T if neuron_major else m
            # float matrices keep the HF orientation (the executor lays them out)
            val = quantize_rows(rows.contiguous(), want) if quantizable(rows, want) else m.to(dtype)
        if is_down and not neuron_major and isinstance(val, QuantRows):
            val = TransposedRows(val.fmt, val.data, val.cols)
        if hf in heads and family.gguf_permuted_qk:
            perm = _unpermute_rows(val.shape[0], heads[hf])
            val = QuantRows(val.fmt, val.data[perm], val.cols) if isinstance(val, QuantRows) else val[perm]
        out[hf] = val
    return out
