"""The OpenAI-compatible routes, the SSE response and the uvicorn runner.

A request's life: the guard admits it; its body is parsed here; the chat template and the
tokenizer run on a dedicated thread (with their own tokenizer copy, so they never stall the
event loop or race the engine's tokenizer); the job is queued on the engine thread; its
events come back through an asyncio queue. A disconnect, streaming or not, cancels the job."""
from __future__ import annotations

import asyncio
import copy
import json
import sys
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.responses import Response

from ...errors import EdgeSparseError
from .guard import Guard
from .metrics import render as render_metrics
from .openai_api import Parsed, RequestError, parse_chat, parse_completion, parse_json
from .options import ServeOptions
from .worker import EngineWorker, Job


class PromptPrep:
    """Chat templating and tokenisation off the event loop, one request at a time."""

    def __init__(self, llm):
        self.llm = llm
        self.tok = copy.deepcopy(llm.tokenizer)   # HF fast tokenizers are not safe to share
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="edgesparse-prep")
        self.ctx = llm.model.spec.max_positions
        # No token stands for more text than its longest piece (with special tokens) spells; x4 for
        # normalisers that shrink text (NFKC's ligatures).  A prompt longer than that times the
        # context is refused before it is tokenised: tokenising 2 MB of text would cost ~150 MB
        # of memory that the allocator keeps.
        pieces = list(self.tok.get_vocab()) + list(getattr(self.tok, "all_special_tokens", ()))
        self.max_prompt_bytes = 4 * max(len(p.encode("utf-8", "replace")) for p in pieces) * self.ctx

    def _check_length(self, req: Parsed) -> None:
        if req.chat:
            n = sum(len(json.dumps(m, ensure_ascii=False).encode()) for m in req.messages)
        else:
            n = len(req.prompt.encode("utf-8", "replace")) if isinstance(req.prompt, str) else 0
        if n > self.max_prompt_bytes:
            raise RequestError(f"prompt of {n} bytes cannot fit the model's context of {self.ctx} tokens "
                               f"(refused before tokenising)", req.prompt_field, code="context_length_exceeded")

    def _ids(self, req: Parsed) -> list[int]:
        self._check_length(req)
        prompt = req.prompt
        if req.chat:
            try:
                prompt = self.llm.chat_prompt(req.messages, tokenizer=self.tok)
            except EdgeSparseError as e:      # no chat template
                raise RequestError(f"{e}: use /v1/completions", "messages") from None
            except Exception as e:      # the template's own checks (role order, ...) are user errors
                raise RequestError(f"the chat template rejected the messages: {str(e).splitlines()[0][:160]}",
                                   "messages") from None
        return self.llm.engine.encode(prompt, tokenizer=self.tok)

    async def ids(self, req: Parsed) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._ids, req)


async def _cancel_on_disconnect(receive, worker: EngineWorker, job: Job) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    worker.cancel(job)


def create_app(llm, opts: ServeOptions | None = None):
    opts = (opts or ServeOptions()).validate()
    worker = EngineWorker(llm.engine, opts.max_queue, opts.stall_timeout_s, opts.parallel)
    prep = PromptPrep(llm)
    model_id, created, ctx = llm.name, int(time.time()), llm.model.spec.max_positions
    chat_stop_ids = llm.chat_stop_ids()   # once: it walks the vocabulary
    defaults = llm.sampling_defaults      # the checkpoint's generation config, for omitted fields

    @asynccontextmanager
    async def lifespan(app):
        app.state.loop = asyncio.get_running_loop()
        yield
        worker.shutdown()
        prep.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="edgesparse", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(RequestError)
    async def _request_error(_, e: RequestError):
        return JSONResponse(status_code=e.status, content=e.body())

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):   # logged for the operator, never shown to the client
        traceback.print_exception(e, file=sys.stderr)
        return JSONResponse(status_code=500, content=RequestError("internal error", status=500,
                                                                  kind="server_error").body())

    async def start_job(req: Parsed) -> Job:
        ids = await prep.ids(req)
        room = ctx - len(ids)
        if room < 1 or (req.max_tokens is not None and req.max_tokens > room):
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens or 1}) exceeds the "
                               f"model's context of {ctx} tokens", req.prompt_field, code="context_length_exceeded")
        req.params.max_new_tokens = req.max_tokens or room
        if req.params.stop_token_ids is None:   # not ignore_eos ([]): the chat template's stops or EOS
            req.params.stop_token_ids = chat_stop_ids if req.chat else None
        try:
            req.params.validate()
        except EdgeSparseError as e:
            raise RequestError(str(e)) from None
        return worker.submit(Job(asyncio.get_running_loop(), ids, req.params))

    async def answer(request: Request, req: Parsed):
        job = await start_job(req)
        rid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "created": int(time.time()), "model": model_id}
        if req.stream:
            return _EventStream(_sse(job, req, head), worker, job)
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, worker, job))
        text = []
        try:
            async for event in job.events():
                if event[0] == "text":
                    text.append(event[1])
        finally:
            watcher.cancel()
            worker.cancel(job)
        _, kind, data = event
        if kind != "finished":
            raise data if kind == "error" else RequestError(
                "the server is shutting down" if kind == "shutdown" else "the request was cancelled",
                status=503, code=kind, kind="server_error")
        return {**head, "object": "chat.completion" if req.chat else "text_completion",
                "choices": [_choice(req.chat, "".join(text), data["finish_reason"], delta=False)],
                "usage": _usage(data)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, parse_chat(parse_json(await request.body()), model_id, defaults))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, parse_completion(parse_json(await request.body()), model_id, defaults))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "edgesparse", "max_model_len": ctx}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(worker, llm.model, opts.parallel), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        h = worker.health()
        body = {**h, "model": model_id, "backend": llm.backend, "ffn_mode": llm.model.ffn_mode}
        return JSONResponse(status_code=200 if h["status"] == "ok" else 503, content=body)

    return Guard(app, opts)


def _choice(chat: bool, text: str, finish, delta: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    if delta:
        return {"index": 0, "delta": {"content": text} if text or finish is None else {}, "finish_reason": finish}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}


def _usage(fin: dict) -> dict:
    return {"prompt_tokens": fin["prompt_tokens"], "completion_tokens": fin["completion_tokens"],
            "total_tokens": fin["prompt_tokens"] + fin["completion_tokens"]}


async def _sse(job: Job, req: Parsed, head: dict):
    """SSE lines: (chat) a role chunk when decoding starts, text chunks, a final chunk with
    ``finish_reason`` and ``usage``, then ``[DONE]``. A failure or shutdown ends the stream
    with an ``error`` event, so a client can tell a cut-off answer from a finished one."""
    base = {**head, "object": "chat.completion.chunk" if req.chat else "text_completion"}

    def sse(payload):
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
    async for event in job.events():
        if event[0] == "start" and req.chat:
            yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
        elif event[0] == "text":
            yield sse({**base, "choices": [_choice(req.chat, event[1], None, delta=True)]})
        elif event[0] == "end":
            _, kind, data = event
            if kind == "finished":
                yield sse({**base, "choices": [_choice(req.chat, "", data["finish_reason"], delta=True)],
                           "usage": _usage(data)})
                if req.include_usage:
                    yield sse({**base, "choices": [], "usage": _usage(data)})
            elif kind == "error":
                yield sse({"error": data.body()["error"]})
            elif kind == "shutdown":
                yield sse({"error": {"message": "the server is shutting down", "type": "server_error",
                                     "param": None, "code": "shutting_down"}})
            yield "data: [DONE]\n\n"


class _EventStream(Response):
    """A text/event-stream response that watches for the client hanging up while it waits
    (also while the job is still queued) and cancels the job then."""

    def __init__(self, chunks, worker: EngineWorker, job: Job):
        self.chunks, self.worker, self.job = chunks, worker, job
        self.background = None
        self.status_code, self.media_type = 200, "text/event-stream"
        self.init_headers()

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, self.worker, self.job))
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:      # the client went away mid-write
            pass
        finally:
            watcher.cancel()
            self.worker.cancel(self.job)


def serve(llm, opts: ServeOptions | None = None, log_level: str = "warning") -> None:
    try:
        import uvicorn
    except ImportError as e:
        raise EdgeSparseError("serve needs the 'serve' extra: pip install edgesparse[serve]") from e
    opts = (opts or ServeOptions()).validate()
    app = create_app(llm, opts)
    inner = app.app

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # In a signal handler: only schedule. The worker's lock may be held by the very
            # frame this signal interrupted.
            loop = getattr(inner.state, "loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(inner.state.worker.shutdown)
            super().handle_exit(sig, frame)

    from .guard import header_deadline_protocol
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=log_level,
                            timeout_graceful_shutdown=opts.shutdown_grace_s, lifespan="on",
                            http=header_deadline_protocol(opts.header_timeout_s))
    Server(config).run()
