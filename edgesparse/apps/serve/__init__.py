"""``edgesparse serve``: a local OpenAI-compatible server (FastAPI + uvicorn, extra ``serve``).

``options`` (what can be set), ``guard`` (Host / Origin / API key / Content-Type / body limit),
``openai_api`` (request parsing), ``worker`` (the engine thread and its jobs), ``app`` (routes)."""
from .options import ServeOptions


def create_app(llm, opts: ServeOptions | None = None):
    from .app import create_app as _create
    return _create(llm, opts)


def serve(llm, opts: ServeOptions | None = None, log_level: str = "warning") -> None:
    from ...errors import EdgeSparseError
    try:
        from .app import serve as _serve
    except ImportError as e:
        raise EdgeSparseError("serve needs the 'serve' extra: pip install edgesparse[serve]") from e
    _serve(llm, opts, log_level)


__all__ = ["ServeOptions", "create_app", "serve"]
