"""The engine thread's contract, with a scripted engine: every job ends with exactly one
terminal event, on every path; health tells the truth; the queue is bounded."""
import asyncio
import threading
import time

import pytest

from edgesparse.errors import InvalidOptionError
from edgesparse.apps.serve.openai_api import RequestError
from edgesparse.apps.serve.options import ServeOptions
from edgesparse.apps.serve.worker import EngineWorker, Job


class ScriptedEngine:
    """Yields ``pieces`` one per step; blocks on ``gate`` before each piece when given."""

    def __init__(self, pieces=("a", "b", "c"), gate: threading.Event | None = None, fail=None):
        self.pieces, self.gate, self.fail = pieces, gate, fail
        self.started = threading.Event()

    def stream(self, ids, params, on_finish=None, on_step=None):
        self.started.set()
        for p in self.pieces:
            if self.gate is not None:
                self.gate.wait(10)
            if self.fail is not None:
                raise self.fail
            on_step()
            yield p
        on_finish({"finish_reason": "stop", "completion_tokens": len(self.pieces)})


async def collect(job, timeout=5.0):
    out = []

    async def run():
        async for ev in job.events():
            out.append(ev)
    await asyncio.wait_for(run(), timeout)
    return out


def terminal(events):
    ends = [e for e in events if e[0] == "end"]
    assert len(ends) == 1 and events[-1] is ends[0]
    return ends[0]


def test_finished_job_streams_then_ends_once():
    async def main():
        w = EngineWorker(ScriptedEngine())
        job = w.submit(Job(asyncio.get_running_loop(), [1, 2], None))
        events = await collect(job)
        assert [e[1] for e in events if e[0] == "text"] == ["a", "b", "c"]
        assert events[0] == ("start", 2)
        _, kind, usage = terminal(events)
        assert kind == "finished" and usage == {"finish_reason": "stop", "prompt_tokens": 2, "completion_tokens": 3}
        w.cancel(job)               # cancelling a finished job changes nothing
        assert w.health()["served"] == 1 and w.health()["cancelled"] == 0
    asyncio.run(main())


@pytest.mark.parametrize("fail,status", [(InvalidOptionError("bad option"), 400), (RuntimeError("secret path"), 500)])
def test_failing_job_ends_with_an_error_and_no_internal_message(fail, status):
    async def main():
        w = EngineWorker(ScriptedEngine(fail=fail))
        _, kind, err = terminal(await collect(w.submit(Job(asyncio.get_running_loop(), [1], None))))
        assert kind == "error" and isinstance(err, RequestError) and err.status == status
        assert "secret" not in str(err)
        assert w.thread.is_alive() and w.health()["failed"] == 1
        ok = await collect(w.submit(Job(asyncio.get_running_loop(), [1], None)))   # the thread lives on
        assert terminal(ok)[1] == "error"
    asyncio.run(main())


def test_cancel_while_queued_and_while_running():
    async def main():
        gate = threading.Event()
        eng = ScriptedEngine(pieces=("x",) * 50, gate=gate)
        w = EngineWorker(eng)
        loop = asyncio.get_running_loop()
        running = w.submit(Job(loop, [1], None))
        queued = [w.submit(Job(loop, [1], None)) for _ in range(10)]
        assert eng.started.wait(5)
        for j in queued:            # hung up while queued: ended at once, engine never sees them
            w.cancel(j)
        for j in queued:
            assert terminal(await collect(j, 1.0))[1] == "cancelled"
        assert w.health()["queued"] == 0
        w.cancel(running)
        gate.set()
        assert terminal(await collect(running))[1] == "cancelled"
        h = w.health()
        assert h["cancelled"] == 11 and h["served"] == 0 and h["running"] == 0
    asyncio.run(main())


def test_shutdown_ends_queued_and_running_jobs_and_refuses_new_ones():
    async def main():
        gate = threading.Event()
        eng = ScriptedEngine(pieces=("x",) * 50, gate=gate)
        w = EngineWorker(eng)
        loop = asyncio.get_running_loop()
        jobs = [w.submit(Job(loop, [1], None)) for _ in range(3)]
        assert eng.started.wait(5)
        w.shutdown()
        gate.set()
        for j in jobs:
            assert terminal(await collect(j))[1] == "shutdown"
        with pytest.raises(RequestError) as e:
            w.submit(Job(loop, [1], None))
        assert e.value.status == 503 and w.health()["status"] == "shutting_down"
    asyncio.run(main())


def test_queue_is_bounded():
    async def main():
        gate = threading.Event()
        w = EngineWorker(ScriptedEngine(gate=gate), max_queue=2)
        loop = asyncio.get_running_loop()
        a, b = w.submit(Job(loop, [1], None)), w.submit(Job(loop, [1], None))
        with pytest.raises(RequestError) as e:
            w.submit(Job(loop, [1], None))
        assert e.value.status == 503 and e.value.code == "queue_full" and w.health()["rejected"] == 1
        gate.set()
        for j in (a, b):
            assert terminal(await collect(j))[1] == "finished"
    asyncio.run(main())


def test_health_is_degraded_when_work_waits_without_progress():
    async def main():
        gate = threading.Event()
        eng = ScriptedEngine(gate=gate)
        w = EngineWorker(eng, stall_timeout_s=0.3)
        assert w.health()["status"] == "ok"          # idle is not a stall
        time.sleep(0.4)
        assert w.health()["status"] == "ok"
        job = w.submit(Job(asyncio.get_running_loop(), [1], None))
        assert eng.started.wait(5)
        assert w.health()["status"] == "ok"
        time.sleep(0.5)
        h = w.health()
        assert h["status"] == "degraded" and h["seconds_since_progress"] > 0.3
        gate.set()
        await collect(job)
        assert w.health()["status"] == "ok"
    asyncio.run(main())


def test_events_posted_after_the_loop_closed_are_dropped():
    loop = asyncio.new_event_loop()
    job = Job(loop, [1], None)
    loop.close()
    job.emit("text", "x")                    # no exception reaches the engine thread
    assert job.end("cancelled") and not job.end("finished")


@pytest.mark.parametrize("kw", [dict(port=0), dict(port=70000), dict(max_body_mb=0), dict(max_queue=0),
                                dict(stall_timeout_s=0), dict(api_key=""), dict(api_key="a b"),
                                dict(cors_origins=["evil.example"])])
def test_bad_serve_options(kw):
    with pytest.raises(InvalidOptionError):
        ServeOptions(**kw).validate()


@pytest.mark.parametrize("bind,header,ok", [
    ("127.0.0.1", "localhost:8000", True), ("127.0.0.1", "[::1]:8000", True), ("127.0.0.1", "LOCALHOST", True),
    ("127.0.0.1", "evil.example", False), ("127.0.0.1", None, False), ("::1", "127.0.0.1", True),
    ("0.0.0.0", "anything.example", True), ("localhost", "localhost.evil.example", False)])
def test_host_allow_list(bind, header, ok):
    assert ServeOptions(host=bind).host_allowed(header) is ok


def test_allowed_host_extends_the_list():
    o = ServeOptions(allowed_hosts=["box.lan"])
    assert o.host_allowed("box.lan:8000") and not o.host_allowed("other.lan")
    assert ServeOptions(host="0.0.0.0", allowed_hosts=["box.lan"]).host_allowed("other.lan") is False


def test_prompt_prep_without_a_chat_template_names_messages(llama_relu):
    pytest.importorskip("fastapi")
    import edgesparse
    from edgesparse.apps.serve.app import PromptPrep
    from edgesparse.apps.serve.openai_api import parse_chat
    llm = edgesparse.load(llama_relu, backend="cpu")
    req = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, llm.name)
    assert PromptPrep(llm)._ids(req) == llm.engine.encode(llm.chat_prompt(req.messages))
    llm.tokenizer.chat_template = None
    with pytest.raises(RequestError) as e:
        PromptPrep(llm)._ids(req)
    assert e.value.param == "messages" and "no chat template" in str(e.value)


def test_batched_slots_survive_a_failed_step_and_a_bad_job():
    """--parallel: a step that raises fails the running jobs, a job that cannot fit fails
    alone; the thread lives on, the slots free up and the next jobs are served."""
    import edgesparse
    from edgesparse.sampling import SamplingParams
    eng = edgesparse.load("tiny", backend="cpu", weights="q4_0").engine

    async def main():
        w = EngineWorker(eng, slots=2)
        loop = asyncio.get_running_loop()
        real, calls = w.batch.step, {"n": 0}

        def flaky():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return real()
        w.batch.step = flaky
        p = SamplingParams(max_new_tokens=6, stop_token_ids=[])
        first = [w.submit(Job(loop, eng.encode("The river"), p)) for _ in range(2)]
        for j in first:
            assert terminal(await collect(j, 30))[1] == "error"
        too_long = w.submit(Job(loop, [1] * 10, SamplingParams(max_new_tokens=10**6)))
        ok = w.submit(Job(loop, eng.encode("The river"), p))
        end_bad, end_ok = terminal(await collect(too_long, 30)), terminal(await collect(ok, 30))
        assert end_bad[1] == "error" and "context" in str(end_bad[2])
        assert end_ok[1] == "finished" and end_ok[2]["completion_tokens"] == 6
        h = w.health()
        assert w.thread.is_alive() and h["running"] == 0 and h["failed"] == 3 and h["served"] == 1
        assert w.batch.free() == 2
    asyncio.run(main())
