"""Finding the text corpus, reading text files for calibration and evaluation, and cutting
them into token windows."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import EmptyDataError, ModelFilesError


def read_texts(files) -> tuple[str, list[dict]]:
    """Concatenate text files; returns the text and a summary (name, bytes, sha256) per file."""
    parts, summary = [], []
    for f in files:
        p = Path(f)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ModelFilesError(f"cannot read data file {p}: {e.strerror or e}") from e
        text = raw.decode("utf-8", errors="replace")
        parts.append(text)
        summary.append(dict(file=p.name, bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest()))
    text = "\n\n".join(parts)
    if not text.strip():
        raise EmptyDataError(f"no text in {', '.join(str(f) for f in files) or 'the given data'}")
    return text, summary


def token_windows(tokenizer, text: str, window: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise ``text`` and cut it into non-overlapping windows ``[n, window]``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // window
    if n == 0:
        raise EmptyDataError(f"the data holds {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[:n * window]).view(n, window)


def find_data_dir() -> Path:
    """``$EDGESPARSE_DATA``, else ``shared/data`` beside the checkout (or the working dir)."""
    import os
    if os.environ.get("EDGESPARSE_DATA"):
        return Path(os.environ["EDGESPARSE_DATA"])
    for parent in [*Path(__file__).resolve().parents, Path.cwd(), *Path.cwd().parents]:
        cand = parent.parent / "shared" / "data"
        if (cand / "tinyshakespeare.txt").exists():
            return cand
    raise ModelFilesError("the default text corpus (../shared/data) was not found; "
                          "pass --data FILE or set EDGESPARSE_DATA")
