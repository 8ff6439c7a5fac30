"""The per-user cache dir: ``$EDGESPARSE_CACHE``, else ``$XDG_CACHE_HOME/edgesparse``, else
``~/.cache/edgesparse``.  Holds the native kernels built for this machine and the config and
tokenizer transformers derives from a GGUF file (slow to derive, small to keep)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("EDGESPARSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgesparse")
    return Path(base)
