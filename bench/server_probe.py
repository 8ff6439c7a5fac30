"""The server under abuse, measured: the hang-up storm that used to wedge it, 64 concurrent
streams, a 1.9 MB prompt, and SIGTERM with streams open. Prints JSON.

    python bench/server_probe.py [--model tiny] [--rounds 5]
"""
import argparse
import concurrent.futures as cf
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

CHAT = "/v1/chat/completions"


def start(model, port):
    proc = subprocess.Popen([sys.executable, "-m", "edgesparse", "serve", model, "--dtype", "bf16", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env=dict(os.environ, EDGESPARSE_QUIET="1"))
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def post_raw(port, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def storm_then_request(port):
    """The issue's reproduction: 20 streams hang up after 1 s; 2 s later a normal request."""
    story = {"messages": [{"role": "user", "content": "tell a story"}], "max_tokens": 256, "stream": True}
    socks = [post_raw(port, story) for _ in range(20)]
    time.sleep(1)
    for s in socks:
        s.close()
    time.sleep(2)
    t0 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}{CHAT}", timeout=20,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    return r.status_code, time.perf_counter() - t0


def big_prompt(port, pid):
    """A 1.9 MB prompt: its status, the slowest /health answered while it is handled, and the
    server's RSS growth (the unit test holds the order of events, this measures the time)."""
    def rss_mb():
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
    rss0, result = rss_mb(), {}
    with cf.ThreadPoolExecutor(1) as pool:
        job = pool.submit(lambda: httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                             json={"prompt": "word " * 380_000, "max_tokens": 4}))
        worst = 0.0
        while not job.done():
            t0 = time.perf_counter()
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.05)
        r = job.result()
    result.update(status=r.status_code, code=r.json()["error"]["code"] if r.status_code != 200 else None,
                  health_worst_s=round(worst, 3), rss_growth_mb=round(rss_mb() - rss0, 1))
    return result


def one_stream(port, i):
    body = {"messages": [{"role": "user", "content": f"Edge device {i}"}], "max_tokens": 16, "stream": True,
            "temperature": 0}
    t0 = time.perf_counter()
    times = []
    with httpx.stream("POST", f"http://127.0.0.1:{port}{CHAT}", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.perf_counter() - t0)
    return times[0], times[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--port", type=int, default=18555)
    a = ap.parse_args()
    proc = start(a.model, a.port)
    try:
        storms = [storm_then_request(a.port) for _ in range(a.rounds)]
        big = big_prompt(a.port, proc.pid)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(64) as pool:
            streams = list(pool.map(lambda i: one_stream(a.port, i), range(64)))
        wall = time.perf_counter() - t0
        health = httpx.get(f"http://127.0.0.1:{a.port}/health").json()
        socks = [post_raw(a.port, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 900,
                                   "stream": True}) for _ in range(3)]
        time.sleep(0.5)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        exit_s = time.perf_counter() - t0
        for s in socks:
            s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    spans = sorted(last - first for first, last in streams)
    print(json.dumps({
        "model": a.model, "cpu_count": os.cpu_count(),
        "storm_then_request": {"rounds": a.rounds, "status": [s for s, _ in storms],
                               "latency_s": [round(t, 3) for _, t in storms],
                               "max_latency_s": round(max(t for _, t in storms), 3)},
        "streams_64": {"wall_s": round(wall, 2), "first_to_last_median_s": round(statistics.median(spans), 3),
                       "first_to_last_max_s": round(spans[-1], 3),
                       "first_chunk_max_s": round(max(f for f, _ in streams), 2)},
        "big_prompt": big, "health_after": health, "sigterm_exit_s": round(exit_s, 2), "exit_code": proc.returncode}, indent=1))


if __name__ == "__main__":
    main()
