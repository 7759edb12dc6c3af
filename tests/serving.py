"""A live server on 127.0.0.1 for the tests: `python -m runtime.serve` in a child process, as users start it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.models import ROOT


class LiveServer:
    def __init__(self, *args, ready_timeout: float = 240):
        cmd = [sys.executable, "-m", "runtime.serve", "--host", "127.0.0.1", "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        line = self.proc.stdout.readline()
        if not line.startswith("serving "):
            raise RuntimeError(f"the server did not start: {line}{self.stop()}")
        self.url = line.split(" on ")[1].strip().rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])
        headers = {"Authorization": f"Bearer {args[args.index('--api-key') + 1]}"} if "--api-key" in args else {}
        try:
            self._wait_ready(ready_timeout, headers)
        except BaseException:  # never leave a server behind
            self.stop()
            raise

    def _wait_ready(self, timeout: float, headers: dict) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.call("/ready", headers=headers, timeout=10)[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the server did not become ready: {self.proc.poll()=}")
            time.sleep(0.2)

    def call(
        self,
        path: str,
        body=None,
        headers: dict | None = None,
        method: str | None = None,
        raw: bytes | None = None,
        timeout: float = 300,
    ):
        """-> (status, response headers (lower-case names), parsed JSON or text)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"} if data is not None else {}
        req = urllib.request.Request(self.url + path, data=data, headers=h | (headers or {}), method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, hdrs, payload = r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, payload = e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
        text = payload.decode("utf-8", "replace")
        try:
            return status, hdrs, json.loads(text)
        except ValueError:
            return status, hdrs, text

    def rss(self) -> int:
        """The server process's resident memory, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metric(self, name: str, **labels) -> float:
        text = self.call("/metrics")[2]
        want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        for line in text.splitlines():
            if line.startswith(name + want + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> str:
        """Stop (SIGTERM, then SIGKILL) and return what the server wrote to stderr."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.stderr.read() if self.proc.stderr else ""
