"""The server under load (bounded in count and time) and its guards: the queue bound (429 + Retry-After), every
request answered exactly once, memory back where it was, cancellation under load, the API key, the time limit."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import pytest

from tests import models
from tests.serving import LiveServer

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")


@pytest.fixture(scope="module")
def model_dir():
    return models.ov_dir("base")


def _txt2img(server: LiveServer, i: int, steps: int = 2, headers: dict | None = None):
    body = {"prompt": f"request {i}", "seed": i, "steps": steps, "width": 64, "height": 64, "force_task_id": f"r{i}"}
    return server.call("/sdapi/v1/txt2img", body, headers=headers)


@pytest.fixture(scope="module")
def server(model_dir):
    s = LiveServer("--model", f"tiny={model_dir}", "--queue-size", "8", "--max-steps", "1000")
    for i in range(3):  # steady state: compiled, buffers allocated
        assert _txt2img(s, i)[0] == 200
    yield s
    assert "Traceback" not in s.stop()


def _memory_is_back(server: LiveServer, before: int) -> None:
    """After a few more requests (buffers at their steady state), RSS is where it was within 5 %."""
    for i in range(3):
        assert _txt2img(server, 300 + i)[0] == 200
    after = server.rss()
    assert abs(after - before) <= 0.05 * before, (before, after)


def test_forty_clients_against_a_queue_of_eight(server):
    rss_before = server.rss()
    ok_before = server.metric("sdxl_requests_total", route="/sdapi/v1/txt2img", outcome="ok")
    images_before = server.metric("sdxl_image_seconds_count", model="tiny")
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda i: _txt2img(server, 100 + i, steps=6), range(40)))
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 429}, statuses
    ok = [a for a in answers if a[0] == 200]
    busy = [a for a in answers if a[0] == 429]
    assert 9 <= len(ok) < 40 and busy  # one running and eight waiting at least; the rest turned away
    for _, headers, body in busy:
        assert int(headers["retry-after"]) >= 1 and "queue" in body["detail"]
    seeds = sorted(json.loads(a[2]["info"])["seed"] for a in ok)
    assert len(set(seeds)) == len(ok) and all(len(a[2]["images"]) == 1 for a in ok)  # none lost or doubled
    ok_after = server.metric("sdxl_requests_total", route="/sdapi/v1/txt2img", outcome="ok")
    assert ok_after - ok_before == len(ok)
    assert server.metric("sdxl_image_seconds_count", model="tiny") - images_before == len(ok)
    _memory_is_back(server, rss_before)


def test_cancel_under_load_and_memory(server):
    rss_before = server.rss()
    gone_before = server.metric("sdxl_requests_total", route="/sdapi/v1/txt2img", outcome="disconnected")
    socks = []
    # 1000 steps (~5 s) at the steady state's 64x64: the running one still runs when its client goes away
    body = json.dumps({"prompt": "slow", "steps": 1000, "width": 64, "height": 64}).encode()
    for _ in range(5):  # five clients queue slow jobs (one runs, four wait), then go away
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        socks.append(s)
    deadline = time.monotonic() + 120
    while server.metric("sdxl_queue_depth", model="tiny") < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        kept = pool.map(lambda i: _txt2img(server, 200 + i), range(4))
        time.sleep(0.5)
        for s in socks:
            s.close()
        answers = list(kept)
    assert [a[0] for a in answers] == [200] * 4  # the clients that stayed are served
    gone = lambda: server.metric("sdxl_requests_total", route="/sdapi/v1/txt2img", outcome="disconnected")  # noqa: E731
    while gone() - gone_before < 5:
        assert time.monotonic() < deadline, server.call("/metrics")[2]
        time.sleep(0.1)
    assert server.metric("sdxl_queue_depth", model="tiny") == 0
    _memory_is_back(server, rss_before)


def test_api_key_and_time_limit(model_dir):
    server = LiveServer("--model", f"tiny={model_dir}", "--api-key", "s3cret", "--timeout", "2")
    try:
        assert server.call("/health")[0] == 200  # the one open route
        for path in ("/", "/ready", "/metrics", "/sdapi/v1/sd-models", "/v1/models"):
            status, headers, _ = server.call(path)
            assert status == 401 and "Basic" in headers["www-authenticate"], path
        status, _, r = server.call("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and r["error"]["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer s3cret"}
        assert _txt2img(server, 1, headers=key)[0] == 200
        assert server.call("/", headers={"Authorization": "Basic dXNlcjpzM2NyZXQ="})[0] == 200  # user:s3cret
        slow = {"prompt": "slow", "steps": 150, "width": 256, "height": 256}
        status, _, r = server.call("/sdapi/v1/txt2img", slow, headers=key)
        assert status == 504 and "--timeout" in r["detail"]
        assert _txt2img(server, 3, headers=key)[0] == 200  # the worker moved on
    finally:
        log = server.stop()
    assert "Traceback" not in log
