"""Sparsity methods, one module each with fit + apply (``svd_predictor``, ``larosa``), the FFN
execution modes (``ffn``), the calibration pass (``calibrate``) and artifact I/O
(``artifacts``).  ``attach_artifacts`` applies a calibrated artifact dir to a loaded model."""
from __future__ import annotations


def attach_artifacts(model, path, with_topk: bool = True):
    """Load artifacts, check them against ``model``, and install them: predictors always, Top-K
    projections only with ``with_topk`` (``apply_topk`` installs them later)."""
    from . import svd_predictor
    from .artifacts import check_artifacts, check_fingerprint, load_artifacts
    arts = load_artifacts(path)
    check_fingerprint(arts, model, path)
    check_artifacts(arts, model.spec, path)   # every shape and value, before any reaches an executor
    svd_predictor.apply(model, arts.tensors, arts.manifest.get("layers"))
    if with_topk:
        apply_topk(model, arts, path)
    return arts


def apply_topk(model, arts, path="artifacts") -> None:
    """Install the artifacts' Top-K projections (and fold their rotations), if they have any."""
    from edgesparse.errors import ArtifactError
    from .larosa import install_topk, rotations_from_tensors
    topk = arts.manifest.get("topk")
    if not topk:
        return
    rot_a = rot_m = None
    if topk["method"] == "rotated":
        try:
            rot_a, rot_m = rotations_from_tensors(arts.tensors, len(model.layers))
        except KeyError as e:
            raise ArtifactError(f"corrupted artifacts in {path}: missing tensor {e}") from None
    install_topk(model, topk["k"], rot_a, rot_m, scaled=topk.get("scaled", False))
