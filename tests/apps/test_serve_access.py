"""API key, CORS and the CLI's serve options, on a real server."""
import subprocess
import sys

import httpx
import pytest

from serve_util import Server

pytest.importorskip("fastapi")
KEY = "s3cret-key"
APP = "http://localhost:3000"


@pytest.fixture(scope="module")
def srv():
    s = Server("tiny", "--dtype", "bf16", "--api-key", KEY, "--cors-origin", APP, "--allowed-host", "box.lan",
               api_key=KEY)
    yield s
    s.stop()


BODY = {"prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Bearer", f"Basic {KEY}", KEY])
def test_api_key_is_required(srv, auth):
    headers = {"authorization": auth} if auth else {}
    r = httpx.post(srv.base + "/v1/completions", json=BODY, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(srv.base + "/v1/models", headers=headers).status_code == 401


def test_right_key_is_served_and_health_is_public(srv):
    ok = {"authorization": f"Bearer {KEY}"}
    assert httpx.post(srv.base + "/v1/completions", json=BODY, headers=ok).status_code == 200
    assert httpx.get(srv.base + "/health").status_code == 200
    # /metrics shows traffic: behind the key like the API (only /health is public)
    assert httpx.get(srv.base + "/metrics").status_code == 401
    assert httpx.get(srv.base + "/metrics", headers=ok).status_code == 200


def test_openai_client_with_and_without_key(srv):
    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=srv.base + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.base + "/v1", api_key="nope", max_retries=0).models.list()


def test_cors_for_the_named_origin_only(srv):
    pre = httpx.options(srv.base + "/v1/chat/completions", headers={
        "origin": APP, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == APP
    assert "authorization" in pre.headers["access-control-allow-headers"]
    r = httpx.post(srv.base + "/v1/completions", json=BODY,
                   headers={"origin": APP, "authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    bad = httpx.options(srv.base + "/v1/chat/completions", headers={
        "origin": "http://evil.example", "access-control-request-method": "POST"})
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers


def test_allowed_host(srv):
    ok = {"authorization": f"Bearer {KEY}"}
    assert httpx.get(srv.base + "/v1/models", headers={**ok, "host": "box.lan"}).status_code == 200
    assert httpx.get(srv.base + "/v1/models", headers={**ok, "host": "evil.lan"}).status_code == 400


@pytest.mark.parametrize("args,needle", [(["--port", "0"], "port"), (["--max-body-mb", "0"], "body"),
                                         (["--cors-origin", "evil"], "origin"), (["--api-key", ""], "API key")])
def test_bad_serve_flags_exit_2_with_one_line(args, needle):
    r = subprocess.run([sys.executable, "-m", "edgesparse", "serve", "tiny", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
