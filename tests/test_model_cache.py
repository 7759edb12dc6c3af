"""runtime.model_cache: the cache folder, LRU eviction under a cap, the list/clear/prune CLI, the locks, and many
processes starting together on a cold cache.

The cold-start race harness also runs alone (PLAIN: OpenVINO's core.compile_model, without the locks):
    python -m tests.test_model_cache race [--rounds 10] [--procs 4] [--plain] [--scale 1.0]
Each round starts PROCS processes on a fresh cache folder; each reads a few small IRs (a pipeline's submodels),
waits for the others, then compiles them in turn and runs each once. It prints the failed processes, the ones killed
by a signal (SIGBUS: a mapped blob truncated by a writer) and the errors.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from runtime import model_cache as mc

ROOT = Path(__file__).resolve().parents[1]
# (width, layers, seed): a pipeline-like sequence of IRs, 4 + 9 + 16 + 4 MB of f32 weights at scale 1
JITTER = 0.5  # s: each process starts after a random delay up to this, as processes started together drift
SPECS = [(512, 4, 1), (768, 4, 2), (1024, 4, 3), (512, 4, 4)]


def build_irs(folder: Path, scale: float = 1.0) -> list[Path]:
    """Small IRs of ReLU(MatMul) layers with random weights (no torch); `scale` multiplies their layer count."""
    import openvino as ov
    import openvino.opset13 as ops

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for width, layers, seed in SPECS:
        xml = folder / f"m{seed}_{width}_{scale:g}.xml"
        if not xml.exists():
            rng = np.random.default_rng(seed)
            x = ops.parameter([1, width], ov.Type.f32, name="x")
            h = x
            for _ in range(max(1, round(layers * scale))):
                w = rng.standard_normal((width, width), dtype=np.float32) / np.float32(np.sqrt(width))
                h = ops.relu(ops.matmul(h, ops.constant(w), False, False))
            ov.save_model(ov.Model([h], [x], f"m{seed}"), xml, compress_to_fp16=False)
        paths.append(xml)
    return paths


def _worker(mode: str, *xmls: str) -> None:
    """One process of the race: per line `CACHE<TAB>BARRIER<TAB>READY` on stdin, a new Core reads the IRs, touches
    READY, waits for BARRIER, then compiles each IR with CACHE_DIR=CACHE and runs it once; prints `RESULT ok` or
    `RESULT error: <the error's last line>`. The process lives for all rounds: one Python start, not one per round."""
    import openvino as ov

    for line in sys.stdin:
        cache, barrier, ready, delay = line.rstrip("\n").split("\t")
        try:
            core = ov.Core()
            models = [core.read_model(x) for x in xmls]
            Path(ready).touch()
            while not os.path.exists(barrier):
                time.sleep(0.002)
            time.sleep(float(delay))
            for model in models:
                config = {"CACHE_DIR": cache}
                if mode == "plain":
                    compiled = core.compile_model(model, "CPU", config)
                else:
                    compiled = mc.compile_model(core, model, "CPU", config)
                width = model.inputs[0].get_partial_shape()[1].get_length()
                compiled.create_infer_request().infer({0: np.ones((1, width), np.float32)})
            del compiled, models, core
            print("RESULT ok", flush=True)
        except Exception as e:
            last = ([s for s in str(e).splitlines() if s.strip()] or [type(e).__name__])[-1]
            print(f"RESULT error: {last[:300]}", flush=True)


def _result(p: subprocess.Popen, deadline: float) -> str | None:
    """The worker's next RESULT line; None if it exited (a signal, a crash) or the deadline passed (then killed)."""
    while True:
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            p.kill()
            p.wait()
            return "timeout"
        line = p.stdout.readline()
        if not line:
            p.wait()
            return None
        if line.startswith("RESULT "):
            return line[len("RESULT ") :].strip()


def race(xmls, work: Path, rounds=10, procs=4, plain=False, jitter=JITTER, timeout=60.0, seed=0) -> dict:
    """`rounds` cold starts of `procs` processes on fresh cache folders under `work`: counts of processes that
    failed (an error), were killed by a signal, or timed out, and the messages. A dead worker is replaced."""
    failed = signals = timeouts = 0
    messages = []
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "tests.test_model_cache", "worker", "plain" if plain else "locked", *map(str, xmls)]
    spawn = lambda: subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # noqa: E731
    workers = [spawn() for _ in range(procs)]
    try:
        for r in range(rounds):
            workers = [w if w.poll() is None else spawn() for w in workers]
            cache, barrier = work / f"cache{r}", work / f"go{r}"
            shutil.rmtree(cache, ignore_errors=True)
            ready = [work / f"ready{r}.{i}" for i in range(procs)]
            for w, flag in zip(workers, ready, strict=True):
                w.stdin.write(f"{cache}\t{barrier}\t{flag}\t{rng.uniform(0, jitter):.3f}\n")
                w.stdin.flush()
            deadline = time.monotonic() + timeout
            while not all(f.exists() for f in ready) and time.monotonic() < deadline:
                if any(w.poll() is not None for w in workers):
                    break
                time.sleep(0.005)
            barrier.touch()  # all go at once
            for w in workers:
                result = _result(w, deadline)
                if result == "ok":
                    continue
                if result == "timeout":
                    timeouts += 1
                    messages.append(f"round {r}: timed out")
                elif result is None and w.returncode < 0:
                    signals += 1
                    messages.append(f"round {r}: killed by {signal.Signals(-w.returncode).name}")
                else:
                    failed += 1
                    messages.append(f"round {r}: {result or f'exit {w.returncode}'}")
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        for w in workers:
            if w.poll() is None:
                w.stdin.close()
                try:
                    w.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    w.kill()
                    w.wait()
    return {"failed": failed, "signals": signals, "timeouts": timeouts, "messages": messages}


# -- folder and cap settings ------------------------------------------------------------------------------------------
def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(mc.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mc.default_cache_dir() == tmp_path / "xdg" / "sdxl-openvino" / "ov_cache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert mc.default_cache_dir() == Path.home() / ".cache" / "sdxl-openvino" / "ov_cache"
    monkeypatch.setenv(mc.ENV_DIR, str(tmp_path / "mine"))
    assert mc.default_cache_dir() == tmp_path / "mine"


def test_max_bytes_from_env(monkeypatch):
    monkeypatch.delenv(mc.ENV_MAX_GB, raising=False)
    assert mc.max_bytes_from_env() == mc.DEFAULT_MAX_BYTES == 20 * 2**30
    monkeypatch.setenv(mc.ENV_MAX_GB, "1.5")
    assert mc.max_bytes_from_env() == 3 * 2**29
    monkeypatch.setenv(mc.ENV_MAX_GB, "inf")
    assert mc.max_bytes_from_env() == float("inf")
    for bad in ("-1", "lots", "nan"):
        monkeypatch.setenv(mc.ENV_MAX_GB, bad)
        with pytest.raises(ValueError, match=mc.ENV_MAX_GB):
            mc.max_bytes_from_env()


# -- entries and eviction ----------------------------------------------------------------------------------------------
def _blob(folder: Path, name: str, size: int, age: float, complete: bool = True) -> Path:
    """A fake cache file of `size` bytes last used `age` seconds ago (complete: read-only, as OpenVINO leaves it)."""
    path = folder / name
    path.write_bytes(b"\0" * size)
    t = time.time() - age
    os.utime(path, (t, t))
    if complete:
        path.chmod(0o440)
    return path


def test_list_entries_least_recently_used_first(tmp_path):
    _blob(tmp_path, "b.blob", 300, age=100)
    _blob(tmp_path, "a.blob", 100, age=300)
    _blob(tmp_path, "k.cl_cache", 50, age=200)
    _blob(tmp_path, "notes.txt", 999, age=1000)  # not OpenVINO's
    (tmp_path / ".lock").touch()
    (tmp_path / "sub.blob").mkdir()
    entries = mc.list_entries(tmp_path)
    assert [(e.path.name, e.bytes) for e in entries] == [("a.blob", 100), ("k.cl_cache", 50), ("b.blob", 300)]
    assert entries[0].last_used == pytest.approx(time.time() - 300, abs=5)
    assert mc.list_entries(tmp_path / "missing") == []


def test_enforce_cap_evicts_least_recently_used_first(tmp_path):
    for i, age in enumerate([50, 400, 10, 300, 200]):  # 1000 bytes each
        _blob(tmp_path, f"{i}.blob", 1000, age=age)
    keep = _blob(tmp_path, "other.txt", 10**6, age=10**5)
    assert mc.enforce_cap(tmp_path, 5000) == []  # at the cap: nothing to do
    removed = mc.enforce_cap(tmp_path, 2500)
    assert [e.path.name for e in removed] == ["1.blob", "3.blob", "4.blob"]  # oldest first, until <= 2500
    assert sorted(e.path.name for e in mc.list_entries(tmp_path)) == ["0.blob", "2.blob"]
    assert keep.exists()
    assert mc.enforce_cap(tmp_path, float("inf")) == []
    assert [e.path.name for e in mc.enforce_cap(tmp_path, 0)] == ["0.blob", "2.blob"]


def test_enforce_cap_keeps_a_file_being_written(tmp_path):
    _blob(tmp_path, "old.blob", 1000, age=1000)
    _blob(tmp_path, "writing.blob", 1000, age=10, complete=False)  # writable and recent: being written
    _blob(tmp_path, "stale.blob", 1000, age=mc.WRITING_GRACE_S + 60, complete=False)  # a writer died long ago
    entries = {e.path.name: e for e in mc.list_entries(tmp_path)}
    assert entries["writing.blob"].writing and not entries["stale.blob"].writing
    removed = mc.enforce_cap(tmp_path, 0)
    assert sorted(e.path.name for e in removed) == ["old.blob", "stale.blob"]
    assert [e.path.name for e in mc.list_entries(tmp_path)] == ["writing.blob"]


def test_enforce_cap_reads_the_env_cap(tmp_path, monkeypatch):
    _blob(tmp_path, "a.blob", 2**20, age=10)
    monkeypatch.setenv(mc.ENV_MAX_GB, "0.0005")  # ~0.5 MiB
    assert [e.path.name for e in mc.enforce_cap(tmp_path)] == ["a.blob"]


def test_clear(tmp_path):
    _blob(tmp_path, "a.blob", 100, age=10)
    _blob(tmp_path, "b.blob", 200, age=10)
    (tmp_path / mc.KEY_LOCK_DIR).mkdir()
    (tmp_path / mc.KEY_LOCK_DIR / "x.lock").touch()
    (tmp_path / "keep.txt").write_text("x")
    assert mc.clear(tmp_path) == 300
    assert mc.list_entries(tmp_path) == [] and (tmp_path / "keep.txt").exists()
    assert not (tmp_path / mc.KEY_LOCK_DIR).exists()
    assert mc.clear(tmp_path) == 0 and mc.clear(tmp_path / "missing") == 0


# -- locks -----------------------------------------------------------------------------------------------------------
_HOLD = """
import sys, time
from pathlib import Path
from runtime import model_cache as mc
with mc.lock(sys.argv[1], shared=sys.argv[2] == "shared") as held:
    assert held
    Path(sys.argv[3]).touch()
    time.sleep(60)
"""


def _hold(lock_file: Path, mode: str, flag: Path) -> subprocess.Popen:
    """A process holding `lock_file` (mode: shared/exclusive) until killed; returns once it holds it."""
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock_file), mode, str(flag)], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not flag.exists():
        assert p.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.01)
    return p


def _kill(p: subprocess.Popen, lock_file: Path) -> float:
    """SIGKILL `p`; returns how long its lock outlived it (the kernel drops it moments after the exit is reaped)."""
    p.send_signal(signal.SIGKILL)
    p.wait()
    dead = time.monotonic()
    while time.monotonic() - dead < 10:
        with mc.lock(lock_file, wait=False) as held:
            if held:
                break
        time.sleep(0.01)
    return time.monotonic() - dead


def test_lock_is_released_when_its_holder_dies(tmp_path):
    lock_file = tmp_path / ".lock"
    holder = _hold(lock_file, "exclusive", tmp_path / "held")
    try:
        with mc.lock(lock_file, wait=False) as held:
            assert not held
        with mc.lock(lock_file, shared=True, wait=False) as held:
            assert not held
    finally:
        assert _kill(holder, lock_file) < 5


def test_enforce_cap_waits_for_compiles(tmp_path):
    """A process compiling (holding the folder's shared lock): nothing is evicted without waiting."""
    _blob(tmp_path, "a.blob", 1000, age=100)
    holder = _hold(tmp_path / mc.LOCK_FILE, "shared", tmp_path / "held")
    try:
        assert mc.enforce_cap(tmp_path, 0, wait=False) == []
        with mc.lock(tmp_path / mc.LOCK_FILE, shared=True, wait=False) as held:
            assert held  # compiles share it
    finally:
        _kill(holder, tmp_path / mc.LOCK_FILE)
    assert [e.path.name for e in mc.enforce_cap(tmp_path, 0, wait=False)] == ["a.blob"]


# -- compiling -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def irs(tmp_path_factory):
    return build_irs(tmp_path_factory.mktemp("irs"))


def test_compile_model_caches_and_marks_use(irs, tmp_path, monkeypatch):
    import openvino as ov

    monkeypatch.delenv(mc.ENV_MAX_GB, raising=False)
    cache = tmp_path / "cache"
    core = ov.Core()
    compiled = mc.compile_model(core, core.read_model(irs[0]), "CPU", {"CACHE_DIR": cache})
    x = np.ones((1, 512), np.float32)
    expected = compiled(x)[0]
    (entry,) = mc.list_entries(cache)
    assert entry.path.suffix == ".blob" and entry.bytes > 4 * 2**20 and not entry.writing
    assert (cache / mc.LOCK_FILE).exists() and len(list((cache / mc.KEY_LOCK_DIR).iterdir())) == 1
    old = time.time() - 3600
    os.utime(entry.path, (old, old))
    del compiled
    core2 = ov.Core()
    core2.set_property({"CACHE_DIR": str(cache)})  # the Core's CACHE_DIR when the config has none
    again = mc.compile_model(core2, core2.read_model(irs[0]), "CPU")  # a hit: the blob mapped, marked used
    np.testing.assert_array_equal(again(x)[0], expected)
    (hit,) = mc.list_entries(cache)
    assert hit.path == entry.path and hit.last_used > time.time() - 60


def test_compile_model_without_cache_takes_no_lock(irs, tmp_path):
    import openvino as ov

    core = ov.Core()
    core.set_property({"CACHE_DIR": str(tmp_path / "core_cache")})
    mc.compile_model(core, core.read_model(irs[0]), "CPU", {"CACHE_DIR": ""})  # "" in the config: no cache
    assert list((tmp_path / "core_cache").iterdir()) == []  # (set_property made the folder) no blob, no lock
    mc.compile_model(ov.Core(), irs[0], "CPU")  # no CACHE_DIR anywhere, a path
    assert list(tmp_path.iterdir()) == [tmp_path / "core_cache"]


def test_compile_model_enforces_the_cap(irs, tmp_path, monkeypatch):
    import openvino as ov

    cache = tmp_path / "cache"
    cache.mkdir()
    _blob(cache, "old.blob", 2**20, age=1000)
    monkeypatch.setenv(mc.ENV_MAX_GB, str(4.5 / 1024))  # 4.5 MiB: the new ~4 MiB blob fits, not with the old 1 MiB
    core = ov.Core()
    mc.compile_model(core, core.read_model(irs[0]), "CPU", {"CACHE_DIR": str(cache)})
    names = [e.path.name for e in mc.list_entries(cache)]
    assert "old.blob" not in names and len(names) == 1


@pytest.mark.slow
def test_parallel_cold_starts(irs, tmp_path):
    """4 processes x 10 cold starts on one cache folder: none fails (without the locks some do: see race())."""
    started = time.monotonic()
    result = race(irs, tmp_path, rounds=10, procs=4, timeout=60)
    assert (result["failed"], result["signals"], result["timeouts"]) == (0, 0, 0), result["messages"]
    assert time.monotonic() - started < 300


# -- command line ----------------------------------------------------------------------------------------------------
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runtime.model_cache", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_cli_list_prune_clear(tmp_path):
    _blob(tmp_path, "a.blob", 3 * 2**20, age=300)
    _blob(tmp_path, "b.blob", 2 * 2**20, age=100)
    _blob(tmp_path, "c.blob", 2**20, age=200)
    r = _cli("--dir", str(tmp_path), "list")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert [line.split()[-1] for line in lines[:3]] == [str(tmp_path / n) for n in ("a.blob", "c.blob", "b.blob")]
    assert "3.00 MiB" in lines[0]
    assert lines[3] == f"total: 3 entries, 6.00 MiB in {tmp_path} (cap 20.00 GiB)"

    r = _cli("--dir", str(tmp_path), "prune", "--max-gb", str(3.5 / 1024))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("removed ") and lines[0].endswith("a.blob")
    assert len(lines) == 4 and lines[-1].endswith("(cap 3.50 MiB); removed 1 entry, 3.00 MiB")

    r = _cli("--dir", str(tmp_path), "clear")
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.splitlines()[-1] == f"total: 0 entries, 0 B in {tmp_path} (cap 20.00 GiB); removed 2 entries, 3.00 MiB"
    )
    assert mc.list_entries(tmp_path) == []


def test_cli_default_dir_from_env(tmp_path):
    r = _cli("list", env={mc.ENV_DIR: str(tmp_path / "never_used"), mc.ENV_MAX_GB: "inf"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"total: 0 entries, 0 B in {tmp_path / 'never_used'} (cap no cap)\n"


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--dir", "{tmp}/missing", "list"], {}, "no such directory"),
        (["--dir", "{tmp}/file", "list"], {}, "not a directory"),
        (["--dir", "{tmp}", "prune", "--max-gb", "-1"], {}, "--max-gb"),
        (["--dir", "{tmp}", "prune", "--max-gb", "lots"], {}, "--max-gb"),
        (["--dir", "{tmp}", "prune"], {mc.ENV_MAX_GB: "lots"}, mc.ENV_MAX_GB),
        (["--dir", "{tmp}", "shrink"], {}, "invalid choice"),
        ([], {}, "required"),
    ],
)
def test_cli_bad_input(tmp_path, args, env, message):
    (tmp_path / "file").touch()
    r = _cli(*(a.format(tmp=tmp_path) for a in args), env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "worker":
        _worker(*argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m tests.test_model_cache race")
    p.add_argument("command", choices=["race"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--plain", action="store_true", help="OpenVINO's core.compile_model, without the locks")
    p.add_argument("--jitter", type=float, default=JITTER, help="each process waits a random delay up to this (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the IRs' layer counts (their size)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        xmls = build_irs(Path(tmp) / "irs", args.scale)
        size = sum(x.with_suffix(".bin").stat().st_size for x in xmls)
        started = time.monotonic()
        result = race(xmls, Path(tmp), args.rounds, args.procs, args.plain, args.jitter, seed=args.seed)
    mode = "plain core.compile_model" if args.plain else "runtime.model_cache.compile_model"
    print(
        f"{mode}: {args.rounds} rounds x {args.procs} processes, {len(xmls)} IRs of {size / 2**20:.0f} MiB: "
        f"{result['failed']} failed, {result['signals']} killed by a signal, {result['timeouts']} timed out "
        f"({time.monotonic() - started:.0f} s)"
    )
    if result["messages"]:
        print("\n".join(result["messages"]))
    return 1 if result["failed"] or result["signals"] or result["timeouts"] else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
