"""Backend registry.  ``get_executor("auto")`` picks the first available backend in auto order
(cann > cuda > cpu, then any plugin registered with ``auto=True`` ahead of them).

Backends load lazily: the built-in ones are named by ``"module:Class"`` and imported on first
use, so asking for ``cpu`` never imports Triton. ``register(cls)`` adds a backend for real
(``--backend NAME`` accepts it from then on), and packages can ship one through the
``edgesparse.backends`` entry-point group (``name = "pkg.module:ExecutorClass"``)."""
from __future__ import annotations

import importlib

from edgesparse.errors import BackendUnavailableError, InvalidOptionError

from .interface import Executor

_REGISTRY: dict[str, "type[Executor] | str"] = {
    "cann": "edgesparse.backends.cann:CannExecutor",
    "cuda": "edgesparse.backends.cuda:CudaExecutor",
    "cpu": "edgesparse.backends.cpu:CpuExecutor",
}
_AUTO: list[str] = ["cann", "cuda", "cpu"]
_entry_points_loaded = False


def register(cls: type[Executor], auto: bool = False) -> type[Executor]:
    """Add (or replace) the backend ``cls.name``. With ``auto=True`` "auto" tries it first."""
    if not (isinstance(cls, type) and issubclass(cls, Executor)) or cls.name in ("auto", "abstract", ""):
        raise InvalidOptionError(f"register() takes an Executor subclass with its own name, got {cls!r}")
    _REGISTRY[cls.name] = cls
    if auto and cls.name not in _AUTO:
        _AUTO.insert(0, cls.name)
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points
    for ep in entry_points(group="edgesparse.backends"):
        _REGISTRY.setdefault(ep.name, ep.value)


def _resolve(name: str) -> type[Executor]:
    cls = _REGISTRY[name]
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    return cls


def backend_names() -> tuple[str, ...]:
    """Every registered backend, auto order first (what ``--backend`` accepts, besides auto)."""
    _load_entry_points()
    return tuple(_AUTO) + tuple(n for n in _REGISTRY if n not in _AUTO)


def choices() -> tuple[str, ...]:
    return ("auto",) + backend_names()


def backend_status() -> dict[str, tuple[bool, str]]:
    """Every registered backend with ``(available, reason)``."""
    out = {}
    for name in backend_names():
        try:
            out[name] = _resolve(name).availability()
        except ImportError as e:        # a plugin whose module is missing
            out[name] = (False, f"cannot import: {e}")
    return out


def available_backends() -> list[str]:
    return [name for name, (ok, _) in backend_status().items() if ok]


def get_executor(name: str = "auto") -> Executor:
    if name not in choices():
        raise InvalidOptionError(f"unknown backend {name!r}; choose one of {', '.join(choices())}")
    status = backend_status()
    if name == "auto":
        name = next(n for n in _AUTO if status[n][0])
    ok, reason = status[name]
    if not ok:
        raise BackendUnavailableError(
            f"backend {name!r} is not available ({reason}); available: {', '.join(available_backends())}")
    cls = _resolve(name)
    return cls(cls.default_device())


def __getattr__(name):       # CHOICES stays importable; it is computed, never retyped
    if name == "CHOICES":
        return choices()
    raise AttributeError(name)


__all__ = ["Executor", "get_executor", "backend_status", "available_backends", "backend_names", "choices",
           "register"]
