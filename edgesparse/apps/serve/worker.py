"""The engine thread and the jobs it runs.

Events go from the engine thread to the request's event loop with ``call_soon_threadsafe``
into an ``asyncio.Queue``: no thread of any pool ever blocks waiting for a token, so a client
that hangs up cannot tie up a thread. ``Job.end`` is idempotent, and every path (finished,
failed, cancelled while queued, cancelled while running, shut down) calls it, so each job
delivers exactly one terminal event and no reader can wait forever."""
from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections import deque

from ...errors import EdgeSparseError
from .openai_api import RequestError


def _internal() -> RequestError:
    return RequestError("internal error while decoding", status=500, kind="server_error")


class _Stop(Exception):
    """Raised inside the decode loop when the job was cancelled (between two tokens)."""


class Job:
    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params):
        self.loop, self.prompt_ids, self.params = loop, prompt_ids, params
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.cancel_kind = "cancelled"
        self._lock = threading.Lock()
        self.ended: str | None = None

    def _post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:        # the loop has closed: nobody is listening any more
            pass

    def emit(self, kind: str, data=None) -> None:
        self._post((kind, data))

    def claim_end(self, kind: str) -> bool:
        """Take the job's one terminal slot; only the first caller gets it."""
        with self._lock:
            if self.ended is not None:
                return False
            self.ended = kind
            return True

    def end(self, kind: str, data=None) -> bool:
        """Terminal event: ``finished`` (data: usage dict), ``error`` (RequestError),
        ``cancelled`` or ``shutdown``. Only the first call counts."""
        if not self.claim_end(kind):
            return False
        self._post(("end", kind, data))
        return True

    async def events(self):
        """``("start", n_prompt)``, ``("text", piece)``..., then one ``("end", kind, data)``."""
        while True:
            event = await self.queue.get()
            yield event
            if event[0] == "end":
                return


class EngineWorker:
    """Runs jobs in arrival order on one background thread: one at a time (``slots`` 1, the
    single-sequence decode path), or up to ``slots`` together, continuously batched
    (``edgesparse/batching.py``): a job takes a free slot between two decode steps."""

    def __init__(self, engine, max_queue: int = 128, stall_timeout_s: float = 60.0, slots: int = 1):
        self.engine, self.max_queue, self.stall_timeout_s = engine, max_queue, stall_timeout_s
        self.slots = slots
        self.batch = None
        if slots > 1:
            from ...batching import BatchDecoder
            self.batch = BatchDecoder(engine, slots)   # allocated now: a bad --parallel fails at start
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self.active: dict[int, Job] = {}   # slot -> running job
        self.stopping = False
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        # totals for /metrics (metrics.py): tokens, and the engine thread's seconds in prefill
        # (submit to first token) and decode (first token to last), over every job it ran
        self.totals = {"prompt_tokens": 0, "completion_tokens": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0}
        self.last_progress = time.monotonic()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="edgesparse-engine")
        self.thread.start()

    # -- called from the event loop ---------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cv:
            if self.stopping:
                raise RequestError("the server is shutting down", status=503, code="shutting_down",
                                   kind="server_error")
            if len(self._pending) + len(self.active) >= self.max_queue:
                self.counts["rejected"] += 1
                raise RequestError(f"the server is busy ({self.max_queue} requests queued); retry later",
                                   status=503, code="queue_full", kind="server_error")
            if not self._pending and not self.active:
                self.last_progress = time.monotonic()   # idle -> busy: the stall clock starts now
            self._pending.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: Job, kind: str = "cancelled") -> None:
        """Drop a queued job at once (its reader gets its terminal event now); a running job
        stops before its next token."""
        with self._cv:
            try:
                self._pending.remove(job)
                queued = True
            except ValueError:
                queued = False
            if job.ended is None:
                job.cancel_kind = kind
            job.cancelled.set()
        if queued:
            self._end(job, kind)

    def shutdown(self) -> None:
        """Refuse new jobs, end the queued ones and stop the running one at its next token."""
        with self._cv:
            self.stopping = True
            pending = list(self._pending)
            running = list(self.active.values())
        for job in pending + running:
            self.cancel(job, "shutdown")

    def health(self) -> dict:
        with self._cv:
            queued, running = len(self._pending), len(self.active)
            busy = bool(running or queued)
            counts = dict(self.counts)
        quiet_s = time.monotonic() - self.last_progress
        if self.stopping:
            status = "shutting_down"
        elif not self.thread.is_alive() or (busy and quiet_s > self.stall_timeout_s):
            status = "degraded"
        else:
            status = "ok"
        return {"status": status, "queued": queued, "running": running, "slots": self.slots,
                "seconds_since_progress": round(quiet_s, 3) if busy else 0.0, **counts}

    def totals_snapshot(self) -> dict:
        with self._cv:
            return dict(self.totals)

    # -- the engine thread ------------------------------------------------------------------------
    def _end(self, job: Job, kind: str, data=None) -> None:
        if job.claim_end(kind):      # counted, and no longer running, before the reader can see the end
            key = {"finished": "served", "error": "failed"}.get(kind, "cancelled")
            with self._cv:
                self.counts[key] += 1
                for slot, j in list(self.active.items()):
                    if j is job:
                        del self.active[slot]
            job._post(("end", kind, data))

    def _loop(self) -> None:
        if self.batch is not None:
            return self._loop_batched()
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                job = self.active[0] = self._pending.popleft()
                self.last_progress = time.monotonic()
            try:
                self._run(job)
            except BaseException:   # never leave a reader waiting, never let the thread die
                traceback.print_exc(file=sys.stderr)
                self._end(job, "error", RequestError("internal error", status=500, kind="server_error"))
            finally:
                with self._cv:
                    self.active.pop(0, None)
                    self.last_progress = time.monotonic()

    # -- continuous batching (slots > 1) ------------------------------------------------------------
    def _loop_batched(self) -> None:
        """Admit queued jobs into free slots, then one decode step for every running job."""
        dec = self.batch
        while True:
            with self._cv:
                while not self._pending and not self.active:
                    self._cv.wait()
                free = [i for i, s in enumerate(dec.seqs) if s is None and i not in self.active]
                admit = []
                while self._pending and free:
                    slot = free.pop(0)
                    admit.append((slot, self._pending.popleft()))
                    self.active[slot] = admit[-1][1]
                self.last_progress = time.monotonic()
            try:
                for slot, job in admit:
                    self._admit(slot, job)
                t0 = time.monotonic()
                stepped = dec.step()
                with self._cv:
                    self.totals["decode_seconds"] += time.monotonic() - t0
                    self.last_progress = time.monotonic()
                for slot in stepped:
                    job = self.active.get(slot)
                    if job is not None:
                        self._deliver(slot, job)
            except BaseException:   # a failed step fails its jobs, never the thread
                traceback.print_exc(file=sys.stderr)
                for slot, job in list(self.active.items()):
                    self._end(job, "error", _internal())
                for slot in range(dec.slots):
                    if dec.seqs[slot] is not None and slot not in self.active:
                        dec.release(slot)

    def _fail(self, job: Job, e: Exception) -> None:
        """End ``job`` on an exception: a user error says what it is, anything else is an
        internal error whose traceback the operator sees and the client does not."""
        if isinstance(e, EdgeSparseError):
            self._end(job, "error", RequestError(str(e)))
            return
        traceback.print_exception(e, file=sys.stderr)
        self._end(job, "error", _internal())

    def _admit(self, slot: int, job: Job) -> None:
        dec, t0 = self.batch, time.monotonic()
        if job.cancelled.is_set():
            self._end(job, job.cancel_kind)
            return
        try:
            dec.admit(job.prompt_ids, job.params, slot)
        except Exception as e:
            self._fail(job, e)
            return
        with self._cv:
            self.totals["prompt_tokens"] += len(job.prompt_ids)
            self.totals["prefill_seconds"] += time.monotonic() - t0
        job.emit("start", len(job.prompt_ids))
        self._deliver(slot, job)

    def _deliver(self, slot: int, job: Job) -> None:
        """Send the slot's new text; end the job if it finished or was cancelled."""
        dec = self.batch
        s = dec.seqs[slot]
        if job.cancelled.is_set():
            dec.release(slot)
            self._end(job, job.cancel_kind)
            return
        piece = s.text.piece(s.row.ids, final=s.finished)
        if piece:
            job.emit("text", piece)
        if s.finished:
            n = len(s.row.ids)
            dec.release(slot)
            with self._cv:
                self.totals["completion_tokens"] += n
            self._end(job, "finished", {"finish_reason": s.row.done or "length",
                                        "prompt_tokens": len(job.prompt_ids), "completion_tokens": n})

    def _account(self, prompt_tokens: int, seen: dict, t_start: float) -> None:
        now, first = time.monotonic(), seen["first"]
        with self._cv:
            t = self.totals
            t["prompt_tokens"] += prompt_tokens
            t["completion_tokens"] += seen["tokens"]
            t["prefill_seconds"] += (first or now) - t_start
            t["decode_seconds"] += now - (first or now)

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._end(job, job.cancel_kind)
            return

        t_start = time.monotonic()
        seen = {"tokens": 0, "first": None}

        def step():
            self.last_progress = time.monotonic()
            seen["tokens"] += 1
            if seen["first"] is None:
                seen["first"] = self.last_progress
            if job.cancelled.is_set():
                raise _Stop

        fin: dict = {}
        job.emit("start", len(job.prompt_ids))
        try:
            try:
                for piece in self.engine.stream(job.prompt_ids, job.params, on_finish=fin.update, on_step=step):
                    job.emit("text", piece)     # cancellation is checked per token, in step()
            finally:
                self._account(len(job.prompt_ids), seen, t_start)
        except _Stop:
            self._end(job, job.cancel_kind)
            return
        except Exception as e:
            self._fail(job, e)
            return
        self._end(job, "finished", {"finish_reason": fin.get("finish_reason", "length"),
                                    "prompt_tokens": len(job.prompt_ids),
                                    "completion_tokens": fin.get("completion_tokens", 0)})
