"""The server's front door, as plain ASGI middleware (nothing reaches a route without it).

In order: the ``Host`` allow-list (DNS rebinding), the ``Origin`` check and CORS (a web page
the user happens to visit must not be able to drive the model), the API key, then for POST:
``Content-Type: application/json`` (a browser's "simple" cross-origin POST carries
``text/plain`` or a form type, so it never runs a generation) and the body limit, which
reads at most ``max_body_bytes`` and at most ``body_timeout_s`` before the route sees it."""
from __future__ import annotations

import asyncio
import hmac
import json
from urllib.parse import urlsplit

from .options import ServeOptions

PUBLIC_PATHS = ("/health",)     # no API key needed (container health checks)


async def _reject(send, status: int, message: str, code: str, param=None, headers=()) -> None:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, opts: ServeOptions):
        self.app, self.opts = app, opts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        o = self.opts
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if not o.host_allowed(host):
            return await _reject(send, 400, f"Host {(host or '')[:80]!r} is not allowed "
                                 "(start the server with --allowed-host NAME to accept it)", "host_not_allowed")
        origin = headers.get("origin")
        cors = None
        if origin is not None:
            if origin in o.cors_origins or "*" in o.cors_origins:
                cors = origin
            elif urlsplit(origin).netloc.lower() != (host or "").lower():
                return await _reject(send, 403, f"cross-origin requests from {origin[:80]!r} are not allowed "
                                     "(start the server with --cors-origin ORIGIN to allow them)",
                                     "origin_not_allowed")
        if cors is not None:
            send = _with_cors(send, cors)
        if scope["method"] == "OPTIONS":       # CORS preflight
            await send({"type": "http.response.start", "status": 204, "headers": [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600"), (b"content-length", b"0")]})
            return await send({"type": "http.response.body", "body": b""})
        if o.api_key is not None and scope["path"] not in PUBLIC_PATHS:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), o.api_key.encode()):
                return await _reject(send, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                     "invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await _reject(send, 415, f"Content-Type must be application/json, got {ctype[:60]!r}",
                                     "unsupported_media_type")
            length = headers.get("content-length")
            if length is not None and not length.isdigit():
                return await _reject(send, 400, "malformed Content-Length", "bad_content_length")
            if length is not None and int(length) > o.max_body_bytes:
                return await _too_large(send, o)     # refused before a byte of it is read
            try:
                body = await asyncio.wait_for(_read_body(receive, o.max_body_bytes), o.body_timeout_s)
            except _TooLarge:
                return await _too_large(send, o)
            except asyncio.TimeoutError:
                return await _reject(send, 408, f"the request body took longer than {o.body_timeout_s:g} s",
                                     "request_timeout")
            if body is None:                   # the client left while sending
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


async def _too_large(send, o: ServeOptions):
    await _reject(send, 413, f"request body larger than the server's limit of {o.max_body_mb:g} MB "
                  "(--max-body-mb)", "request_too_large")


async def _read_body(receive, limit: int) -> bytes | None:
    parts, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive):
    """The body once, then the real channel (so routes still see ``http.disconnect``)."""
    sent = False

    async def wrapped():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return wrapped


def _with_cors(send, origin: str):
    async def wrapped(msg):
        if msg["type"] == "http.response.start":
            msg = dict(msg, headers=[*msg.get("headers", []), (b"access-control-allow-origin", origin.encode()),
                                     (b"vary", b"Origin")])
        await send(msg)
    return wrapped


def header_deadline_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline on request headers: a connection that has not
    sent a whole request head ``seconds`` after it opened (or after the first byte of its next
    request, on a kept-alive connection) is closed.  uvicorn itself times out idle kept-alive
    connections and nothing else, so 50 slow-loris clients could otherwise hold 50 sockets
    open for as long as they trickle a byte now and then."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            if self._deadline is None:
                self._deadline = self.loop.call_later(seconds, self._expired)

        def _expired(self):
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()   # still no whole request head

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self._deadline is not None:
                self._deadline.cancel()   # the head is in: the body has its own timeout
                self._deadline = None

        def connection_lost(self, exc):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

    return HeaderDeadline
