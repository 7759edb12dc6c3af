"""Ray for the runtime (the `[ray]` extra): start a cluster on this machine bound to 127.0.0.1, connect to one, and
size actor pools from its CPUs. Used by `runtime.batch --ray` (Ray Data) and meant for the server on Ray Serve.

Ray is imported only when one of these functions runs (`import_ray`), so the base install never needs it. On one
machine everything listens on 127.0.0.1: Ray turns a loopback --node-ip-address into the machine's "reachable"
address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is in the environment (LOOPBACK_ENV), which every function here
sets before Ray starts.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.errors import RuntimeInputError

LOOPBACK = "127.0.0.1"
# keep the loopback node IP (see the module docstring); no usage-stats prompt or upload
# token authentication always on (Ray 2.60 turns it on for `ray.init()` clusters but not for `ray start --head` unless
# ~/.ray/auth_token exists when it starts: a token written meanwhile by another Ray locks a client out of a head that
# started without one). The token is ~/.ray/auth_token, made by the first Ray that needs it.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
INSTALL_HINT = "pip install 'sdxl-openvino[ray]' (Ray 2.60)"


def import_ray(module: str = "ray"):
    """`ray` (or `ray.data`, `ray.serve`), or one clear error naming the extra when it is not installed."""
    os.environ.update(LOOPBACK_ENV)
    try:
        return importlib.import_module(module)  # the optional extra: never imported by the base install
    except ImportError as e:
        raise RuntimeInputError(f"--ray needs {module} ({e}): {INSTALL_HINT}") from None


def is_loopback(address: str) -> bool:
    """Whether a Ray address (`HOST:PORT`, `ray://HOST:PORT`, `auto`) names this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None, **kwargs):
    """ray.init on loopback -> the `ray` module. address None: start a local Ray in this process, as ray.init()
    does (num_cpus: its CPUs, default all), dashboard off; else connect to a running cluster (`HOST:PORT` of its
    head, or `auto`). A connection that fails is one RuntimeInputError line."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kwargs.setdefault("log_to_driver", False)  # the workers' output stays in the cluster's logs
    kwargs.setdefault("logging_level", logging.WARNING)  # no "Connecting to ..." lines
    options = dict(include_dashboard=False, **kwargs)
    if address is not None:
        _reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, _node_ip_address=LOOPBACK, _temp_dir=temp_dir, **options)
        else:
            if is_loopback(address):
                options["_node_ip_address"] = LOOPBACK
            options.pop("include_dashboard")  # the cluster's head decides
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeInputError(f"cannot connect to Ray at {address or 'a new local cluster'}: {first}") from None
    return ray


def _reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT that nothing answers on fails now, in one line (ray.init would retry for minutes)."""
    if "://" in address or ":" not in address:  # ray://, auto: Ray's own lookup
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise RuntimeInputError(f"cannot reach Ray at {address}: {reason} (is `ray start --head` running?)") from None


def node_cpus(ray) -> list[float]:
    """The CPUs of each alive node of the connected cluster."""
    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]


def pool_size(cpus: list[float], cpus_per_actor: float | None, actors: int | None, work: int) -> tuple[int, float]:
    """-> (actors, CPUs each) for an actor pool on nodes with these CPUs: by default one actor per node with the
    smallest node's CPUs (one compiled model per machine, all its cores to OpenVINO), never more actors than
    fit (an actor holds its CPUs while the pool runs: more would wait forever) nor than `work` items."""
    usable = [c for c in cpus if c >= 1]
    if not usable:
        raise RuntimeInputError("the Ray cluster has no node with a CPU")
    each = float(cpus_per_actor) if cpus_per_actor is not None else float(int(min(usable)))
    if each <= 0:
        raise RuntimeInputError(f"CPUs per actor={cpus_per_actor!r} must be positive")
    fit = sum(int(c // each) for c in usable)
    if fit == 0:
        raise RuntimeInputError(f"an actor of {each:g} CPUs fits on no node of the Ray cluster (CPUs: {cpus})")
    if actors is not None and not 1 <= actors <= fit:
        raise RuntimeInputError(f"{actors} actors of {each:g} CPUs: the Ray cluster fits 1 to {fit} (CPUs: {cpus})")
    return max(1, min(actors or fit, work)), each


def _session(sid: int) -> list[int]:
    """The live processes of session `sid` (one started with start_new_session=True and its children); zombies,
    already dead and waiting for a parent to reap them, are left out."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid and _state(entry) != "Z":
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def ensure_token() -> None:
    """Make ~/.ray/auth_token (`ray get-auth-token --generate`) when no token is there: `ray start --head` in token
    mode (LOOPBACK_ENV) needs one and, unlike ray.init(), does not make it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file() and path.stat().st_size:
        return
    cmd = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "get-auth-token", "--generate"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **LOOPBACK_ENV})
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeInputError(f"cannot make a Ray auth token at {path}: {proc.stderr.strip()[-300:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class HeadNode:
    """`ray start --head --block` on 127.0.0.1 in a session of its own (tests, the README's example): `address`
    to connect to, `stop()` ends every process it started (its session) and nothing else, unlike `ray stop`,
    which ends every Ray on the machine. Its own auth token (Ray 2.60's token authentication), not the shared
    ~/.ray/auth_token that another Ray started meanwhile may replace: `env` holds it, and this process's
    environment carries it until stop(), so that clients started from here (or ray.init here) are let in.

    with HeadNode(num_cpus=2) as head:
        subprocess.run([..., "--ray", head.address])"""

    def __init__(self, num_cpus: int | None = None, port: int | None = None, temp_dir: str | None = None,
                 timeout: float = 120.0):  # fmt: skip
        self.port = port or free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        # a short path of its own: Ray's unix sockets live there (107-byte limit), and no other Ray shares it
        self._own_temp_dir = temp_dir is None
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.log = Path(self.temp_dir) / "head.log"
        self.env = {**LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self._saved_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        cmd = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block",
               "--node-ip-address", LOOPBACK, "--port", str(self.port), "--include-dashboard=false",
               "--disable-usage-stats", "--temp-dir", self.temp_dir, "--ray-client-server-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()),  # fixed defaults: 10001, 52365
               *(["--num-cpus", str(num_cpus)] if num_cpus is not None else [])]  # fmt: skip
        import_ray()  # the clear error when the extra is missing
        ensure_token()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env}, start_new_session=True)  # fmt: skip
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "Ray runtime started" in text:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {text.strip()[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"ray start --head did not start in {timeout:g} s (log: {self.log})")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to `ray start --block`, then, after `timeout` seconds, SIGKILL to every process left in its
        session (its GCS, raylet, workers and actors: some actors move to process groups of their own, none
        leaves the session); then its temporary folder goes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(25):  # a process may start while the others are being killed
            pids = _session(self.proc.pid)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if not pids:
                break
            time.sleep(0.2)
        self.proc.wait()
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._own_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> HeadNode:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
