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
