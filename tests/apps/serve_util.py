"""Start a real ``edgesparse serve`` on loopback for the server tests, and read its RSS."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from conftest import reap, spawn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "edgesparse", "serve", model, "--port", str(self.port), *args]
        env = dict(os.environ, EDGESPARSE_QUIET="1")
        self.proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        for _ in range(600):
            try:
                if httpx.get(self.base + "/health", timeout=1, headers=headers).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not come up in 60 s")

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=5).json()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def raw(self, data: bytes, read: bool = True, timeout: float = 10) -> bytes:
        """Send bytes on a fresh connection; return what comes back until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            if not read:
                return b""
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
                    if b"\r\n\r\n" in out and b"connection: close" in out.lower():
                        head, _, body = out.partition(b"\r\n\r\n")
                        n = int(next((l.split(b":")[1] for l in head.split(b"\r\n")
                                      if l.lower().startswith(b"content-length")), b"-1"))
                        if n >= 0 and len(body) >= n:
                            break
            except (socket.timeout, ConnectionResetError):
                pass
            return out

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> int:
        return reap(self.proc, sig, timeout)


def http_request(path: str, body: bytes, host: str = "127.0.0.1", ctype: str = "application/json",
                 extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0
