"""A real server on loopback, driven by the official openai client and raw HTTP."""
import concurrent.futures as cf
import socket
import subprocess
import sys
import time

import httpx
from conftest import reap, spawn
import pytest

openai = pytest.importorskip("openai")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ckpt_factory):
    llama_relu = ckpt_factory("llama", "relu", max_position_embeddings=4096)   # room for long jobs
    port = free_port()
    proc = spawn([sys.executable, "-m", "edgesparse", "serve", str(llama_relu), "--backend", "cpu",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
    yield base, llama_relu.name
    reap(proc)


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)


def test_models_and_health(server):
    base, name = server
    assert [m.id for m in client(base).models.list().data] == [name]
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_chat_non_stream_and_stream_agree(server):
    base, name = server
    c = client(base)
    msgs = [{"role": "user", "content": "The quick brown fox"}]
    full = c.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0)
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_completions_seed_and_stop(server):
    base, name = server
    c = client(base)
    kw = dict(model=name, prompt="Sparse activations", max_tokens=10, temperature=1.0, seed=3)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    greedy = c.completions.create(model=name, prompt="Sparse activations", max_tokens=10, temperature=0).choices[0]
    stop = greedy.text[2:5]
    if stop.strip():
        cut = c.completions.create(model=name, prompt="Sparse activations", max_tokens=10, temperature=0, stop=stop)
        assert cut.choices[0].text == greedy.text[:greedy.text.find(stop)]


def test_32_concurrent_streams_all_complete(server):
    base, name = server

    def one(i):
        stream = client(base).chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"Edge device {i}"}], max_tokens=6, stream=True,
            temperature=0)
        chunks = list(stream)
        return chunks[-1].choices[0].finish_reason, chunks[-1].usage.completion_tokens

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(reason in ("stop", "length") and n >= 1 for reason, n in results)
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_disconnect_mid_stream_is_dropped(server):
    base, name = server
    before = httpx.get(base + "/health").json()["cancelled"]
    # long enough that the job is still decoding when the hang-up is seen, however loaded the
    # machine: 200 tokens of this small model could finish first, and nothing is then cancelled
    body = {"model": name, "prompt": "The quick", "max_tokens": 3000, "stream": True, "temperature": 0,
            "stop": [], "ignore_eos": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
        for _ in r.iter_lines():
            break  # read one event, then hang up
    other = client(base).completions.create(model=name, prompt="Edge", max_tokens=4, temperature=0)
    assert other.choices[0].text is not None
    for _ in range(1200):   # liveness only: the cancellation is seen well before the job could end
        if httpx.get(base + "/health").json()["cancelled"] > before:
            break
        time.sleep(0.1)
    assert httpx.get(base + "/health").json()["cancelled"] > before


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/chat/completions", b"{not json", "malformed JSON"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, "does not exist"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/completions", {"prompt": "word " * 5000, "max_tokens": 10}, "context"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "min_p": 2}, "min_p"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": "yes"}, "ignore_eos"),
])
def test_bad_requests_get_400_with_openai_error_body(server, path, body, needle):
    base, _ = server
    if isinstance(body, bytes):
        r = httpx.post(base + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(base + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_ignore_eos_turns_off_the_end_tokens():
    """vLLM's and llama.cpp's extension: the end token does not stop the answer (the server
    keeps the empty stop list; tests/apps/test_serve_parallel.py decodes a random model, which
    samples its end token, to max_tokens with it)."""
    from edgesparse.apps.serve.openai_api import parse_chat, parse_completion
    assert parse_completion({"prompt": "x", "ignore_eos": True}, "m").params.stop_token_ids == []
    assert parse_completion({"prompt": "x"}, "m").params.stop_token_ids is None
    chat = parse_chat({"messages": [{"role": "user", "content": "x"}], "ignore_eos": True}, "m")
    assert chat.params.stop_token_ids == []


def test_openai_client_raises_bad_request(server):
    base, name = server
    with pytest.raises(openai.BadRequestError):
        client(base).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def _metrics(base) -> dict:
    r = httpx.get(base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_requests_and_tokens(server):
    base, name = server
    before = _metrics(base)
    done = client(base).completions.create(model=name, prompt="The quick brown fox", max_tokens=5, temperature=0)
    after = _metrics(base)
    served = 'edgesparse_requests_total{outcome="served"}'
    assert after[served] == before[served] + 1
    grew = after["edgesparse_completion_tokens_total"] - before["edgesparse_completion_tokens_total"]
    assert grew == done.usage.completion_tokens
    assert after["edgesparse_prompt_tokens_total"] - before["edgesparse_prompt_tokens_total"] == done.usage.prompt_tokens
    assert after["edgesparse_decode_seconds_total"] >= before["edgesparse_decode_seconds_total"]
    assert after["edgesparse_queue_depth"] == 0 and after["edgesparse_slots"] == 1 and after["edgesparse_healthy"] == 1
    assert any(k.startswith("edgesparse_info{") for k in after)
