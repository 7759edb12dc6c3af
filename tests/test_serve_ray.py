"""The server on Ray Serve, on a local cluster bound to 127.0.0.1 (`ray start --head` with 2 CPUs): two model
replicas of one CPU each answer the same API as the single-process server; requests are spread over both (each
A1111 answer's `info.replica` names the replica, HOST:PID, that made it); progress and interrupts reach the replica
holding the job; a replica killed mid-image gives its request a 503 in the API's shape, the other replica's
request is not disturbed, and a retry succeeds."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import models
from tests.models import ROOT
from tests.serving import LiveServer

pytest.importorskip("ray.serve", reason="ray[serve] (the [ray] extra) is not installed")
pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")


class RayServer(LiveServer):
    """`python -m runtime.serve --ray --address HEAD` in a child process (Serve's proxy on 127.0.0.1:port)."""

    def __init__(self, address: str, port: int, *args, ready_timeout: float = 300):
        cmd = [sys.executable, "-m", "runtime.serve", "--ray", "--address", address, "--host", "127.0.0.1",
               "--port", str(port), *map(str, args)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)  # fmt: skip
        line = self.proc.stdout.readline()
        if not line.startswith("serving "):
            raise RuntimeError(f"the Ray server did not start: {line}{self.stop()[-3000:]}")
        self.url, self.port = f"http://127.0.0.1:{port}", port
        try:
            self._wait_ready(ready_timeout, {})
        except BaseException:
            self.stop()
            raise


@pytest.fixture(scope="module")
def cluster():
    from runtime.ray_cluster import HeadNode

    with HeadNode(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="module")
def server(cluster):
    from runtime.ray_cluster import free_port

    s = RayServer(cluster.address, free_port(), "--model", f"tiny={models.ov_dir('base')}", "--replicas", 2,
                  "--cpus-per-replica", 1)  # fmt: skip
    yield s
    s.stop()


def _txt2img(server, seed: int, steps: int = 2, size: int = 64, task: str | None = None):
    body = {"prompt": "a boat", "seed": seed, "steps": steps, "width": size, "height": size}
    if task:
        body["force_task_id"] = task
    return server.call("/sdapi/v1/txt2img", body)


def _replica(answer) -> str:
    return json.loads(answer[2]["info"])["replica"]


def test_requests_are_spread_over_two_replicas(server):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda i: _txt2img(server, i, steps=8, size=128), range(6)))
    assert [a[0] for a in answers] == [200] * 6
    assert len({_replica(a) for a in answers}) == 2  # two processes answered
    assert json.loads(answers[0][2]["info"])["all_seeds"] == [0]
    status, _, r = server.call("/sdapi/v1/txt2img", {"prompt": "x", "width": 63})  # the same errors
    assert status == 400 and "multiple of 8" in r["detail"]
    status, _, r = server.call("/v1/images/generations", {"prompt": "x", "model": "nope"})
    assert status == 404 and "unknown model" in r["error"]["message"]


def test_progress_and_interrupt_reach_the_replica(server):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_txt2img, server, 5, 150, 256, "ray-slow")
        deadline = time.monotonic() + 120
        while True:
            p = server.call("/sdapi/v1/progress?id_task=ray-slow")[2]
            if p["state"].get("sampling_step", 0) >= 2 and p["current_image"]:
                break
            assert time.monotonic() < deadline, p
            time.sleep(0.2)
        assert p["state"]["replica"] and 0 < p["progress"] < 1
        assert server.call("/sdapi/v1/interrupt?id_task=ray-slow", {})[0] == 200
        status, _, r = slow.result(timeout=120)
    info = json.loads(r["info"])
    assert status == 200 and info["interrupted"] and info["sdxl_openvino"][0]["interrupted_at_step"] < 150


def test_a_killed_replica_fails_its_request_only(server):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        doomed = pool.submit(_txt2img, server, 7, 150, 256, "doomed")
        deadline = time.monotonic() + 120
        while not (state := server.call("/sdapi/v1/progress?id_task=doomed")[2]["state"]).get("sampling_step"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        other = pool.submit(_txt2img, server, 8, 30, 128)  # goes to the other replica (one request each)
        time.sleep(1.0)
        os.kill(int(state["replica"].rsplit(":", 1)[1]), signal.SIGKILL)
        status, headers, r = doomed.result(timeout=120)
        assert status == 503 and "died" in r["detail"] and r["error"] == "Unavailable"
        ok = other.result(timeout=120)
        assert ok[0] == 200 and _replica(ok) != state["replica"]
    assert _txt2img(server, 9)[0] == 200  # a retry succeeds
