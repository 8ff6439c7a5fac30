"""Crafted inputs for the fuzz suite, generated from seed files: GGUF files cut at every
structural boundary, with counts and lengths at 2^62-2^64, with in-bounds edits to dims,
types and offsets, with metadata values changed, and with random byte flips (fixed seed);
artifact dirs with wrong shapes, values and manifest entries under a recomputed checksum.

The GGUF layout is walked here independently of ``edgesparse.gguf_header`` (the code under
test), recording where each field sits so that a case can change exactly one of them."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Layout:
    version: int = 4
    n_tensors: int = 8
    n_kv: int = 16
    kv: list = field(default_factory=list)       # (key, key_len_pos, type_pos, value_pos, vtype, end)
    tensors: list = field(default_factory=list)  # dict(name, len_pos, ndims_pos, dims_pos, type_pos, offset_pos, ...)
    infos_end: int = 0
    data_start: int = 0


def walk(b: bytes) -> Layout:
    lay, pos = Layout(), 24
    n_tensors, n_kv = struct.unpack_from("<QQ", b, 8)

    def u(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, b, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return v

    def s():
        n = u("Q")
        nonlocal pos
        pos += n
        return b[pos - n:pos].decode()
    align = 32
    for _ in range(n_kv):
        klen = pos
        key = s()
        tpos = pos
        vt = u("I")
        vpos = pos
        if vt == 8:
            s()
        elif vt == 9:
            et, n = u("I"), u("Q")
            if et == 8:
                for _ in range(n):
                    s()
            else:
                pos += n * SIZES[et]
        else:
            if key == "general.alignment":
                align = struct.unpack_from("<I", b, pos)[0]
            pos += SIZES[vt]
        lay.kv.append((key, klen, tpos, vpos, vt, pos))
    for _ in range(n_tensors):
        t = dict(len_pos=pos)
        t["name"] = s()
        t["ndims_pos"] = pos
        nd = u("I")
        t["dims_pos"] = pos
        t["dims"] = [u("Q") for _ in range(nd)]
        t["type_pos"] = pos
        t["type"] = u("I")
        t["offset_pos"] = pos
        t["offset"] = u("Q")
        lay.tensors.append(t)
    lay.infos_end = pos
    lay.data_start = -(-pos // align) * align
    return lay


def put(b: bytes, pos: int, fmt: str, value) -> bytes:
    return b[:pos] + struct.pack("<" + fmt, value) + b[pos + struct.calcsize("<" + fmt):]


def gguf_cases(seed: Path, tag: str, n_flips: int = 0, metadata: bool = True, every_tensor: bool = True):
    """(case id, file bytes) pairs from one seed GGUF file."""
    b = seed.read_bytes()
    lay = walk(b)
    out = []
    # -- truncation at every structural boundary ----------------------------------------------
    cuts = {0, 3, 4, 10, 16, 23, 24, lay.infos_end, lay.data_start, len(b) - 1}
    for key, klen, tpos, vpos, vt, end in lay.kv:
        cuts.update((klen + 4, tpos, vpos + 2, end))
    for t in lay.tensors:
        cuts.update((t["len_pos"] + 5, t["dims_pos"], t["type_pos"] + 1, t["offset_pos"] + 3))
        cuts.add(lay.data_start + t["offset"] + 7)
    cuts = sorted(c for c in cuts if c < len(b))
    if not every_tensor:
        cuts = cuts[::max(1, len(cuts) // 12)]
    out += [(f"{tag}-cut-{c}", b[:c]) for c in cuts]
    # -- counts and lengths at 2^62 .. 2^64 - 1 -------------------------------------------------
    huge = (1 << 62, 1 << 63, (1 << 64) - 1)
    for v in huge:
        out.append((f"{tag}-tensor-count-{v}", put(b, 8, "Q", v)))
        out.append((f"{tag}-kv-count-{v}", put(b, 16, "Q", v)))
        out.append((f"{tag}-key-length-{v}", put(b, lay.kv[0][1], "Q", v)))
        strings = [kv for kv in lay.kv if kv[4] == 8]
        out.append((f"{tag}-string-length-{v}", put(b, strings[0][3], "Q", v)))
        arrays = [kv for kv in lay.kv if kv[4] == 9]
        out.append((f"{tag}-array-length-{v}", put(b, arrays[0][3] + 4, "Q", v)))
        out.append((f"{tag}-name-length-{v}", put(b, lay.tensors[0]["len_pos"], "Q", v)))
        out.append((f"{tag}-dim-{v}", put(b, lay.tensors[-1]["dims_pos"], "Q", v)))
        out.append((f"{tag}-offset-{v}", put(b, lay.tensors[1]["offset_pos"], "Q", v)))
    for v in (0, 1, 99, 1 << 31):
        out.append((f"{tag}-version-{v}", put(b, 4, "I", v)))
    out.append((f"{tag}-bad-magic", b"GGUG" + b[4:]))
    out.append((f"{tag}-empty", b""))
    # -- in-bounds edits of the tensor table ---------------------------------------------------
    # a big seed (SmolLM2, 98 MB a case) gets the issue's edits on two tensors, a small one every edit on all
    tensors = lay.tensors if every_tensor else [t for t in lay.tensors if t["name"] in ("blk.0.ffn_up.weight",
                                                                                         "blk.0.ffn_down.weight")]
    for t in tensors:
        name, dims = t["name"], t["dims"]
        if len(dims) == 2:
            out.append((f"{tag}-{name}-rows-1", put(b, t["dims_pos"] + 8, "Q", 1)))
            out.append((f"{tag}-{name}-rows-half", put(b, t["dims_pos"] + 8, "Q", max(1, dims[1] // 2))))
            out.append((f"{tag}-{name}-cols-half", put(b, t["dims_pos"], "Q", dims[0] // 2)))
            swapped = put(put(b, t["dims_pos"], "Q", dims[1]), t["dims_pos"] + 8, "Q", dims[0])
            out.append((f"{tag}-{name}-dims-swapped", swapped))
        else:
            out.append((f"{tag}-{name}-len-half", put(b, t["dims_pos"], "Q", dims[0] // 2)))
        for typ in ({0, 1, 2, 3, 8, 12, 99} if every_tensor else {8, 99}) - {t["type"]}:   # F32 F16 Q4_0 Q4_1 Q8_0 Q4_K, unknown
            out.append((f"{tag}-{name}-type-{typ}", put(b, t["type_pos"], "I", typ)))
        out.append((f"{tag}-{name}-offset+1", put(b, t["offset_pos"], "Q", t["offset"] + 1)))
        out.append((f"{tag}-{name}-offset+32", put(b, t["offset_pos"], "Q", t["offset"] + 32)))
        out.append((f"{tag}-{name}-rank-3", put(b, t["ndims_pos"], "I", 3)))
        out.append((f"{tag}-{name}-rank-0", put(b, t["ndims_pos"], "I", 0)))
    emb = next(t for t in lay.tensors if t["name"] == "token_embd.weight")
    for other in [t for t in lay.tensors if "ffn" in t["name"]][:3 if every_tensor else 1]:   # the embedding pointed at FFN data
        out.append((f"{tag}-embd-at-{other['name']}", put(b, emb["offset_pos"], "Q", other["offset"])))
    # -- metadata values changed, in bounds ----------------------------------------------------
    if metadata:
        for key, klen, tpos, vpos, vt, end in lay.kv:
            if vt == 4 and key.startswith("llama."):
                val = struct.unpack_from("<I", b, vpos)[0]
                for new in {0, 1, val + 1, val // 2, 1 << 31} - {val}:
                    out.append((f"{tag}-{key}-{new}", put(b, vpos, "I", new)))
            if vt == 6:
                for new in (0.0, -1.0, float("nan"), float("inf")):
                    out.append((f"{tag}-{key}-{new}", put(b, vpos, "f", new)))
            if key in ("general.architecture", "tokenizer.ggml.model"):
                out.append((f"{tag}-{key}-type-string-to-uint", put(b, tpos, "I", 4)))
            if vt == 9:
                out.append((f"{tag}-{key}-element-type-99", put(b, vpos, "I", 99)))
        arch = next(kv for kv in lay.kv if kv[0] == "general.architecture")
        n = struct.unpack_from("<Q", b, arch[3])[0]
        out.append((f"{tag}-architecture-renamed", b[:arch[3] + 8] + b"x" * n + b[arch[3] + 8 + n:]))
    # -- random byte flips, fixed seed ---------------------------------------------------------
    rng = random.Random(f"{tag}-flips")
    for i in range(n_flips):
        mut = bytearray(b)
        lo, hi = (0, lay.infos_end) if i % 4 else (lay.data_start, len(b))
        for _ in range(rng.randint(1, 4)):
            mut[rng.randrange(lo, hi)] = rng.randrange(256)
        out.append((f"{tag}-flip-{i}", bytes(mut)))
    return out


# -- artifacts ------------------------------------------------------------------------------------
def _write_artifact(src: Path, dst: Path, tensors: dict | None = None, manifest_edit=None) -> Path:
    """A copy of the artifact dir ``src`` with its tensors and manifest edited and the
    manifest's checksum recomputed, as an attacker would."""
    from safetensors.torch import load_file, save_file
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    ts = load_file(str(src / "artifacts.safetensors"))
    if tensors:
        for k, v in tensors.items():
            if v is None:
                ts.pop(k, None)
            else:
                ts[k] = v(ts) if callable(v) else v
    save_file({k: v.contiguous() for k, v in ts.items()}, str(dst / "artifacts.safetensors"))
    man = json.loads((src / "manifest.json").read_text())
    if manifest_edit:
        manifest_edit(man)
    man["tensors_sha256"] = hashlib.sha256((dst / "artifacts.safetensors").read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def predictor_artifact_cases(src: Path, work: Path, tag: str):
    """(case id, artifact dir) pairs from an artifact dir with SVD predictors."""
    import torch
    a0 = "layers.0.predictor.a"
    b0, bias0 = "layers.0.predictor.b", "layers.0.predictor.bias"
    edits = {
        "a-half-rows": {a0: lambda t: t[a0][: t[a0].shape[0] // 2]},
        "rank-mismatch": {b0: lambda t: t[b0][:-1]},
        "bias-10": {bias0: lambda t: t[bias0][:10]},
        "a-3d": {a0: lambda t: t[a0][None]},
        "rank-0": {a0: lambda t: t[a0][:, :0], b0: lambda t: t[b0][:0]},
        "a-nan": {a0: lambda t: torch.full_like(t[a0], float("nan"))},
        "a-int": {a0: lambda t: t[a0].to(torch.int32)},
        "b-missing": {b0: None},
        "unknown-tensor": {"layers.0.evil": torch.zeros(3)},
        "layer-99": {"layers.99.predictor.a": lambda t: t[a0].clone()},
        "b-transposed": {b0: lambda t: t[b0].T.contiguous()},
    }
    manifests = {
        "layers-5": lambda m: m.update(layers=5),
        "layers-bad-index": lambda m: m["layers"][0].update(layer=99),
        "layers-duplicate": lambda m: m["layers"].append(dict(m["layers"][0])),
        "layers-bad-mode": lambda m: m["layers"][0].update(mode="warp"),
        "layers-string-index": lambda m: m["layers"][0].update(layer="0"),
        "topk-int": lambda m: m.update(topk=dict(method="magnitude", k=5)),
        "topk-k-huge": lambda m: m.update(topk=dict(method="magnitude", k=dict(qkv=1 << 40, o=8))),
        "manifest-list": None,
        "fingerprint-string": lambda m: m.update(fingerprint="x"),
    }
    out = []
    for name, e in edits.items():
        out.append((f"{tag}-{name}", _write_artifact(src, work / f"{tag}-{name}", tensors=e)))
    for name, e in manifests.items():
        d = _write_artifact(src, work / f"{tag}-{name}", manifest_edit=e)
        if e is None:
            (d / "manifest.json").write_text("[1, 2]")
        out.append((f"{tag}-{name}", d))
    return out


def topk_artifact_cases(src: Path, work: Path, tag: str):
    """(case id, artifact dir) pairs from an artifact dir with rotated Top-K (SwiGLU model)."""
    import torch
    r0 = "layers.0.rotation.attn"
    edits = {
        "rotation-wrong-shape": {r0: lambda t: t[r0][:-1]},
        "rotation-not-orthogonal": {r0: lambda t: t[r0] * 3},
        "rotation-missing": {"layers.1.rotation.mlp": None},
        "rotation-inf": {r0: lambda t: torch.full_like(t[r0], float("inf"))},
    }

    def k_set(site, v):
        def f(m):
            k = m["topk"]["k"]
            for entry in (k if isinstance(k, list) else [k]):
                entry[site] = v
        return f
    manifests = {
        "k-int": lambda m: m["topk"].update(k=7),
        "k-list-short": lambda m: m["topk"].update(k=[m["topk"]["k"]] if isinstance(m["topk"]["k"], dict) else m["topk"]["k"][:1]),
        "k-qkv-0": k_set("qkv", 0), "k-qkv-huge": k_set("qkv", 1 << 20), "k-o-bool": k_set("o", True),
        "k-down-float": k_set("down", 3.5), "k-mlp-missing": lambda m: [e.pop("mlp", None) for e in (
            m["topk"]["k"] if isinstance(m["topk"]["k"], list) else [m["topk"]["k"]])],
        "method-unknown": lambda m: m["topk"].update(method="psychic"),
        "scaled-string": lambda m: m["topk"].update(scaled="yes"),
        "topk-list": lambda m: m.update(topk=[1]),
    }
    out = []
    for name, e in edits.items():
        out.append((f"{tag}-{name}", _write_artifact(src, work / f"{tag}-{name}", tensors=e)))
    for name, e in manifests.items():
        out.append((f"{tag}-{name}", _write_artifact(src, work / f"{tag}-{name}", manifest_edit=e)))
    return out
