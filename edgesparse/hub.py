"""Hugging Face hub ids as model paths: ``org/name``, ``org/name@revision``, and a GGUF file
of a repo as ``org/name:FILE.gguf`` (or ``org/name@revision:FILE.gguf``).

Files come through ``huggingface_hub``'s cache (``HF_HUB_CACHE`` / ``HF_HOME``), so a model
fetched once, by edgesparse or transformers, is read from there; ``HF_HUB_OFFLINE=1`` is
respected and a model that is neither reachable nor cached is a one-line error."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import ModelFilesError

HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?(?::(?P<file>[\w.-]+\.gguf))?$")
# What a checkpoint dir needs (never every quantisation a GGUF repo holds)
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def parse_hub_id(spec: str):
    """``(repo, revision, gguf file)`` of a hub id, or None when ``spec`` is not one."""
    m = HUB_ID.match(spec)
    return None if m is None else (m["repo"], m["rev"], m["file"])


def is_hub_id(spec: str) -> bool:
    """``spec`` has a hub id's shape and does not read as a mistyped local path (its first part
    exists here, or it names a weights file)."""
    local_like = Path(spec.split("/")[0]).expanduser().exists() or spec.split(":")[0].endswith((".gguf", ".safetensors"))
    return parse_hub_id(spec) is not None and not local_like


def fetch(spec: str) -> Path:
    """The local path (snapshot dir, or the GGUF file in it) of a hub id."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    repo, rev, gguf = parse_hub_id(spec)
    try:
        snap = Path(snapshot_download(repo, revision=rev, allow_patterns=[gguf] if gguf else CHECKPOINT_FILES))
    except RepositoryNotFoundError:
        raise ModelFilesError(f"no such model on the Hugging Face hub: {repo} (or it is private)") from None
    except RevisionNotFoundError:
        raise ModelFilesError(f"{repo} has no revision {rev!r}") from None
    except LocalEntryNotFoundError:
        raise ModelFilesError(f"{spec} is not in the Hugging Face cache and the hub cannot be reached "
                              "(offline or HF_HUB_OFFLINE=1): fetch it once online, or give a local path") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelFilesError(f"cannot fetch {spec} from the Hugging Face hub: {str(e).splitlines()[0]}") from None
    if gguf:
        if not (snap / gguf).exists():
            raise ModelFilesError(f"{repo} has no file {gguf}")
        return snap / gguf
    if not (snap / "config.json").exists() or not list(snap.glob("*.safetensors")):
        ggufs = sorted(p.name for p in snap.glob("*.gguf"))
        hint = f"; pick a GGUF file as {repo}:FILE.gguf" + (f" ({', '.join(ggufs)})" if ggufs else "")
        raise ModelFilesError(f"{repo} has no safetensors checkpoint{hint}")
    return snap
