"""Mistral: the Llama layout with a sliding attention window."""
from __future__ import annotations

from .families import Family

FAMILY = Family(name="mistral", rules=lambda c: dict(sliding_window=getattr(c, "sliding_window", None)))
