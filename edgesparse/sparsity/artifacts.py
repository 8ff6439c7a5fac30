"""Calibration artifacts (I/O only): one safetensors file plus a JSON manifest, written
atomically.  Installing them on a model is ``sparsity.attach_artifacts``.

The manifest holds a fingerprint of the model (config, weight shapes and a checksum of
the weights the artifacts depend on) so artifacts are never applied to another model, and
the sha256 of the tensor file so a corrupted copy is refused."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgesparse import __version__
from edgesparse.errors import ArtifactError, FingerprintMismatchError
from edgesparse.models.weights import Attention, GatedMLP

FORMAT_VERSION = 1
TENSORS = "artifacts.safetensors"
MANIFEST = "manifest.json"


def model_fingerprint(model) -> dict:
    """Architecture + shapes + a checksum of the FFN and norm weights (bf16-rounded, so the
    same checkpoint loaded in fp32, bf16 or fp16-from-disk gives the same fingerprint)."""
    if not all(isinstance(l.attn, Attention) and isinstance(l.mlp, GatedMLP) for l in model.layers):
        raise ArtifactError("artifacts are fitted to and checked against a freshly loaded model; "
                            "this one already has Top-K installed")
    s = model.spec
    arch = {k: getattr(s, k) for k in ("family", "vocab_size", "hidden", "intermediate", "n_layers",
                                         "n_heads", "n_kv_heads", "head_dim", "act")}
    h = hashlib.blake2b(digest_size=16)
    for layer in model.layers:
        ffn = layer.mlp.ffn
        for t in (layer.mlp.norm, layer.attn.norm, ffn.gate, ffn.up, ffn.down_t):
            h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return dict(arch=arch, weights_blake2b=h.hexdigest())


@dataclass
class Artifacts:
    manifest: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def has_ffn_calibration(self) -> bool:
        """Predictors, or per-layer FFN modes (a layer left exact or dense by the cost model)."""
        return (any(k.endswith(".predictor.a") for k in self.tensors)
                or any("mode" in layer for layer in self.manifest.get("layers", ())))


def save_artifacts(out_dir, manifest: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write into a temporary sibling dir, fsync, then rename over ``out_dir``: an interrupted
    or failed write (Ctrl-C, full disk) leaves the previous state, never a half-written dir."""
    from safetensors.torch import save_file
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        manifest = dict(manifest, format_version=FORMAT_VERSION, edgesparse_version=__version__,
                        tensors_sha256=_sha256(tmp / TENSORS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for f in (TENSORS, MANIFEST):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_artifacts(path) -> Artifacts:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    p = Path(path)
    if not (p / MANIFEST).is_file() or not (p / TENSORS).is_file():
        raise ArtifactError(f"{p} is not an artifact dir (expected {MANIFEST} and {TENSORS})")
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"corrupted manifest in {p}: {e}") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"corrupted manifest in {p}: expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact format {manifest.get('format_version')!r} in {p}; "
                            f"this edgesparse reads format {FORMAT_VERSION}: re-run calibrate")
    if _sha256(p / TENSORS) != manifest.get("tensors_sha256"):
        raise ArtifactError(f"corrupted artifacts in {p}: {TENSORS} does not match its manifest checksum")
    try:
        tensors = load_file(str(p / TENSORS))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"corrupted artifacts in {p}: {e}") from e
    return Artifacts(manifest, tensors)


def check_fingerprint(arts: Artifacts, model, path) -> None:
    _check_manifest_types(arts.manifest, path)
    fmt, have = arts.manifest.get("weights", "float"), model.ex.weight_format or "float"
    if fmt != have:   # predictors are fitted to the weights that run: a format change voids them
        fix = f"load the model with --weights {fmt}" if fmt != "float" else f"re-run calibrate with --weights {have}"
        raise FingerprintMismatchError(f"artifacts in {path} were calibrated with {fmt} weights but the model "
                                       f"has {have} weights: {fix}")
    want, got = arts.manifest.get("fingerprint", {}), model_fingerprint(model)
    if want.get("arch") != got["arch"]:
        diff = [k for k in got["arch"] if want.get("arch", {}).get(k) != got["arch"][k]]
        raise FingerprintMismatchError(f"artifacts in {path} were calibrated for another model "
                                       f"(differs in {', '.join(diff)})")
    if want.get("weights_blake2b") != got["weights_blake2b"]:
        raise FingerprintMismatchError(f"artifacts in {path} were calibrated for another model "
                                       "(same architecture, different weights)")


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- every shape against the model --------------------------------------------------------------
# Artifacts are data, never code: the manifest is JSON and the tensors safetensors, and both
# are checked here against the model they are put on before a value reaches an executor (the
# manifest's checksum guards against a damaged copy, not against an edited one).
TOPK_METHODS = ("rotated", "magnitude")


def _check_manifest_types(m: dict, path) -> None:
    for key, kind in (("fingerprint", dict), ("weights", str), ("layers", list), ("topk", dict)):
        if m.get(key) is not None and not isinstance(m[key], kind):
            raise ArtifactError(f"corrupted manifest in {path}: {key} is {type(m[key]).__name__}, "
                                f"expected {kind.__name__}")
    fp = m.get("fingerprint") or {}
    if fp.get("arch") is not None and not isinstance(fp["arch"], dict):
        raise ArtifactError(f"corrupted manifest in {path}: fingerprint.arch is not an object")


def _int_in(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def check_artifacts(arts: Artifacts, spec, path) -> None:
    """Every tensor name, shape, dtype and value, and every manifest entry the runtime reads,
    against ``spec``; a mismatch is an ArtifactError naming the entry, what was expected and
    what was found."""
    n, d, d_ff = spec.n_layers, spec.hidden, spec.intermediate
    bad = lambda what: ArtifactError(f"corrupted artifacts in {path}: {what}")  # noqa: E731
    from edgesparse.models.weights import ReGLUMLP
    seen = set()
    for entry in arts.manifest.get("layers") or ():
        if not isinstance(entry, dict) or not _int_in(entry.get("layer"), 0, n - 1):
            raise bad(f"layer entry {str(entry)[:60]} has no layer index from 0 to {n - 1}")
        if entry["layer"] in seen:
            raise bad(f"layer {entry['layer']} is listed twice")
        seen.add(entry["layer"])
        if entry.get("mode", "predictor") not in ReGLUMLP.modes:
            raise bad(f"layer {entry['layer']} has mode {entry.get('mode')!r}; expected one of {', '.join(ReGLUMLP.modes)}")
    shapes = {}
    for i in range(n):
        key = f"layers.{i}.predictor"
        if f"{key}.a" in arts.tensors or f"{key}.b" in arts.tensors or f"{key}.bias" in arts.tensors:
            a = arts.tensors.get(f"{key}.a")
            r = a.shape[-1] if a is not None and a.dim() == 2 else -1
            if not 1 <= r <= min(d, d_ff):
                raise bad(f"{key}.a has shape {list(a.shape) if a is not None else 'missing'}; "
                          f"expected [{d}, rank] with rank from 1 to {min(d, d_ff)}")
            shapes.update({f"{key}.a": (d, r), f"{key}.b": (r, d_ff), f"{key}.bias": (d_ff,)})
        for site in ("attn", "mlp"):
            if f"layers.{i}.rotation.{site}" in arts.tensors:
                shapes[f"layers.{i}.rotation.{site}"] = (d, d)
    for name, t in arts.tensors.items():
        if name not in shapes:
            raise bad(f"unexpected tensor {name} (a model of {n} layers has predictors and rotations only)")
    for name, shape in shapes.items():
        t = arts.tensors.get(name)
        if t is None:
            raise bad(f"tensor {name} is missing (expected shape {list(shape)})")
        if tuple(t.shape) != shape:
            raise bad(f"tensor {name} has shape {list(t.shape)}; the model implies {list(shape)}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise bad(f"tensor {name} must hold finite floating-point values ({t.dtype})")
    topk = arts.manifest.get("topk")
    if topk:
        _check_topk(topk, arts.tensors, spec, bad)


def _check_topk(topk: dict, tensors: dict, spec, bad) -> None:
    n, nq = spec.n_layers, spec.n_heads * spec.head_dim
    if topk.get("method") not in TOPK_METHODS:
        raise bad(f"topk.method is {topk.get('method')!r}; expected one of {', '.join(TOPK_METHODS)}")
    if not isinstance(topk.get("scaled", False), bool):
        raise bad(f"topk.scaled is {topk.get('scaled')!r}; expected true or false")
    ks = topk.get("k")
    per_layer = ks if isinstance(ks, list) else [ks] * n
    if not isinstance(ks, (dict, list)) or len(per_layer) != n:
        raise bad(f"topk.k must be an object of Top-K sizes or a list of {n} of them (one per layer), found {str(ks)[:40]}")
    inputs = {"qkv": spec.hidden, "o": nq}
    if not spec.is_reglu:
        inputs.update(mlp=spec.hidden, down=spec.intermediate)
    for i, k in enumerate(per_layer):
        where = f"topk.k[{i}]" if isinstance(ks, list) else "topk.k"
        if not isinstance(k, dict):
            raise bad(f"{where} is {str(k)[:40]}, not an object of Top-K sizes")
        for site, width in inputs.items():
            if not _int_in(k.get(site), 1, width):
                raise bad(f"{where}.{site} is {k.get(site)!r}; expected an integer from 1 to {width}")
    if topk["method"] == "rotated":
        for i in range(n):
            for site in ("attn", "mlp"):
                q = tensors.get(f"layers.{i}.rotation.{site}")
                if q is None:
                    raise bad(f"tensor layers.{i}.rotation.{site} is missing (rotated Top-K needs one per site)")
                probe = torch.randn(q.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                ratio = (q.double() @ probe).norm(dim=0) / probe.norm(dim=0)
                if not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3):
                    raise bad(f"tensor layers.{i}.rotation.{site} is not a rotation (it changes vector lengths)")
