"""The structure of a GGUF file, parsed strictly: an untrusted file is refused here, with one
line naming what is wrong, before any of it reaches transformers, numpy or the native kernels.

Checked: the magic and version (2 or 3), every count and length against the bytes left in
the file, every metadata value type, ``general.alignment`` (a power of two), and for each
tensor its name (unique, at most 64 bytes), its rank (1 to 4), dims (positive, whole blocks
per row), type (a ggml type), offset (aligned) and byte extent (inside the file, overlapping
no other tensor).  Whether the tensors are the ones the model's config implies is
``gguf_file.check_tensors``'s job; this module knows nothing of models."""
from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

VERSIONS = (2, 3)             # v1 had 32-bit counts and is long gone
MAX_NAME = 64                 # ggml's GGML_MAX_NAME
MAX_DIMS = 4
# value type -> struct code (8: string, 9: array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
MIN_KV_BYTES = 8 + 4 + 1       # key length, value type, the smallest value
MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8   # name length, rank, one dim, type, offset


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF file (one line: what, where)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]     # GGUF order: columns first
    type_name: str            # ggml type, e.g. "Q4_0"
    type_id: int
    offset: int               # absolute, in the file
    nbytes: int

    @property
    def rows(self) -> int:
        n = 1
        for d in self.dims[1:]:
            n *= d
        return n


@dataclass
class Header:
    version: int
    alignment: int
    tensors: list[TensorInfo]
    data_start: int
    metadata: dict            # scalar and string values; arrays as their (element type, length)
    metadata_sha256: str      # the key/value section's bytes
    names_sha256: str         # the tensor names, in order


def parse_header(path: Path) -> Header:
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size < 24:
            raise GGUFFormatError(f"not a GGUF file ({size} bytes, shorter than a header)")
        # mapped, not read: only the header's pages are touched (and the map is closed below)
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(mm, size)
    finally:
        mm.close()


def _parse(buf, size: int) -> Header:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    pos = 0

    def need(n: int, what: str):
        if n < 0 or pos + n > size:
            raise GGUFFormatError(f"{what} at byte {pos} runs past the end of the file (truncated or corrupt)")

    def take(fmt: str, what: str):
        nonlocal pos
        n = struct.calcsize("<" + fmt)
        need(n, what)
        v = struct.unpack_from("<" + fmt, buf, pos)[0]
        pos += n
        return v

    def string(what: str, limit: int | None = None) -> str:
        nonlocal pos
        n = take("Q", f"{what} length")
        if limit is not None and n > limit:
            raise GGUFFormatError(f"{what} at byte {pos - 8} is {n} bytes long (at most {limit})")
        need(n, what)
        pos += n
        try:
            return bytes(buf[pos - n:pos]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{what} at byte {pos - n} is not UTF-8") from None

    def value(vtype: int, key: str, nested: bool = False):
        nonlocal pos
        if vtype in SCALARS:
            return take(SCALARS[vtype], f"value of {key}")
        if vtype == STRING:
            return string(f"string value of {key}")
        if vtype == ARRAY and not nested:
            etype, n = take("I", f"array type of {key}"), take("Q", f"array length of {key}")
            if etype in SCALARS:
                step = struct.calcsize("<" + SCALARS[etype])
                need(n * step if n <= size else size + 1, f"array {key} of {n} elements")
                pos += n * step
            elif etype == STRING:
                if n > (size - pos) // 8:
                    raise GGUFFormatError(f"array {key} claims {n} strings, more than the file can hold")
                for _ in range(n):
                    string(f"string in array {key}")
            else:
                raise GGUFFormatError(f"array {key} has element type {etype}, which GGUF does not define"
                                      if etype != ARRAY else f"array {key} nests arrays (not supported)")
            return (etype, n)
        raise GGUFFormatError(f"metadata {key} has value type {vtype}, which GGUF does not define")

    if buf[:4] != b"GGUF":
        raise GGUFFormatError("not a GGUF file (bad magic)")
    pos = 4
    version = take("I", "version")
    if version not in VERSIONS:
        raise GGUFFormatError(f"GGUF version {version}; edgesparse reads versions {VERSIONS[0]} and {VERSIONS[1]}")
    n_tensors, n_kv = take("Q", "tensor count"), take("Q", "metadata count")
    if n_kv > (size - pos) // MIN_KV_BYTES:
        raise GGUFFormatError(f"metadata count {n_kv} is more than the file's {size} bytes can hold")
    if n_tensors > (size - pos) // MIN_TENSOR_BYTES:
        raise GGUFFormatError(f"tensor count {n_tensors} is more than the file's {size} bytes can hold")
    kv_start = pos
    metadata: dict = {}
    for _ in range(n_kv):
        key = string("metadata key", 65535)
        if key in metadata:
            raise GGUFFormatError(f"metadata key {key!r} appears twice")
        vtype = take("I", f"value type of {key}")
        metadata[key] = (vtype, value(vtype, key))
    kv_sha = hashlib.sha256(buf[kv_start:pos]).hexdigest()
    alignment = 32
    if "general.alignment" in metadata:
        vtype, alignment = metadata["general.alignment"]
        if vtype != 4 or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 16:
            raise GGUFFormatError(f"general.alignment {alignment!r} is not a power of two up to 65536 (uint32)")
    infos, names = [], hashlib.sha256()
    for _ in range(n_tensors):
        name = string("tensor name", MAX_NAME)
        if any(t[0] == name for t in infos):
            raise GGUFFormatError(f"tensor {name} appears twice")
        names.update(name.encode() + b"\0")
        n_dims = take("I", f"rank of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFFormatError(f"tensor {name} has rank {n_dims} (1 to {MAX_DIMS})")
        dims = tuple(take("Q", f"dims of {name}") for _ in range(n_dims))
        type_id, offset = take("I", f"type of {name}"), take("Q", f"offset of {name}")
        infos.append((name, dims, type_id, offset))
    data_start = -(-pos // alignment) * alignment
    tensors = []
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name} has type {type_id}, which is not a ggml type") from None
        if any(d <= 0 for d in dims):
            raise GGUFFormatError(f"tensor {name} has dims {list(dims)}: every dim must be positive")
        if dims[0] % block:
            raise GGUFFormatError(f"tensor {name} ({qtype.name}) has rows of {dims[0]} values, "
                                  f"not whole blocks of {block}")
        if offset % alignment:
            raise GGUFFormatError(f"tensor {name} starts at data offset {offset}, "
                                  f"not a multiple of the alignment {alignment}")
        nbytes = dims[0] // block * block_bytes
        for d in dims[1:]:
            nbytes *= d
            if nbytes > size:
                break
        lo = data_start + offset
        if lo + nbytes > size:
            raise GGUFFormatError(f"tensor {name} ({qtype.name} {list(dims)}, {nbytes} bytes at byte {lo}) "
                                  f"runs past the end of the {size}-byte file (truncated?)")
        tensors.append(TensorInfo(name, dims, qtype.name, type_id, lo, nbytes))
    # llama.cpp's own reader demands this layout (each tensor right after the one before,
    # padded to the alignment), so every file it loads passes; it also rules out overlaps and
    # a type or dims relabelled to a smaller extent that would still fit in the file.
    expected = 0
    for t in tensors:
        if t.offset - data_start != expected:
            raise GGUFFormatError(f"tensor {t.name} starts at data offset {t.offset - data_start}; the tensors "
                                  f"before it ({t.type_name} sizes) put it at {expected}")
        expected += -(-t.nbytes // alignment) * alignment
    plain = {k: v for k, (t, v) in metadata.items()}
    return Header(version, alignment, tensors, data_start, plain, kv_sha, names.hexdigest())
