"""Llama (and checkpoints in its layout: TinyLlama, SmolLM2, the embedded ``tiny``)."""
from __future__ import annotations

from .families import Family

FAMILY = Family(name="llama")
