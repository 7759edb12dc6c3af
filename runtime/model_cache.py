"""OpenVINO's model cache (CACHE_DIR): where it is, a size cap with least-recently-used eviction, and compiles that
many processes can run at once on one cache folder.

OpenVINO 2026.4 writes one `<hash>.blob` per compiled model (per model, shapes, device and compile properties)
straight to its final path: no temporary file, no rename and no lock between processes. It then makes the blob
read-only (0440); a cache hit maps the blob into memory, and the compiled model keeps that mapping. So when
processes start together on a cold cache, one can read a half-written blob, fail to import it and delete it under
its writer (whose chmod then fails: "filesystem error: cannot set permissions ... blob"), or map a blob that another
writer truncates (SIGBUS at the first touch of a page past the new end). `compile_model` below serializes the
compiles of one model within one cache folder with a file lock, so the second process waits while the first writes
and then hits the finished blob.

Locks (flock, released by the kernel when their holder exits, however it exits), all inside the cache folder:
  `.lock`            shared by every compile, exclusive for eviction and clearing (so nothing is evicted while any
                     process compiles, i.e. possibly writes or reads a blob)
  `.locks/<key>.lock` exclusive around one compile; the key is a digest of what the model's cache hash depends on
                     (its inputs', outputs' shapes and types and its number of operations), so compiles of one model
                     wait for each other while different models compile in parallel (a collision only serializes).
Evicting a blob unlinks it: a process that has it mapped keeps its pages (the file's space is freed when it unmaps).

python -m runtime.model_cache [--dir DIR] list|clear|prune [--max-gb N]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openvino as ov

from runtime.errors import RuntimeInputError

try:
    import fcntl
except ImportError:  # not POSIX: compiles run unlocked, as OpenVINO's own do
    fcntl = None

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ENV_DIR",
    "ENV_MAX_GB",
    "Entry",
    "clear",
    "compile_model",
    "default_cache_dir",
    "enforce_cap",
    "list_entries",
    "lock",
    "max_bytes_from_env",
    "parse_gb",
]

ENV_DIR = "SDXL_OPENVINO_CACHE_DIR"
ENV_MAX_GB = "SDXL_OPENVINO_CACHE_MAX_GB"
GIB = 2**30
# SDXL fp16: the UNet's blob is ~5 GiB, a whole pipeline (text encoders, UNet, VAE) ~7 GiB per set of shapes.
DEFAULT_MAX_BYTES = 20 * GIB
ENTRY_SUFFIXES = (".blob", ".cl_cache")  # what OpenVINO writes there (CPU, NPU: .blob; GPU kernels: .cl_cache)
LOCK_FILE = ".lock"
KEY_LOCK_DIR = ".locks"
WRITING_GRACE_S = 600.0  # a still-writable blob (OpenVINO chmods it 0440 when complete) this recent is being written


def default_cache_dir() -> Path:
    """$SDXL_OPENVINO_CACHE_DIR if set, else ($XDG_CACHE_HOME or ~/.cache)/sdxl-openvino/ov_cache."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdxl-openvino" / "ov_cache"


def parse_gb(text: str) -> float:
    """A size in GiB ("20", "0.5"; "inf", "none", "off" or "unlimited": no cap) -> bytes (math.inf: no cap)."""
    raw = str(text).strip().lower()
    if raw in ("inf", "none", "off", "unlimited"):
        return math.inf
    try:
        gb = float(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not a size in GB (a number >= 0, or 'inf')") from None
    if not gb >= 0:  # also NaN
        raise ValueError(f"{text!r} is not a size in GB (a number >= 0, or 'inf')")
    return math.inf if math.isinf(gb) else int(gb * GIB)


def max_bytes_from_env() -> float:
    """The cache's cap in bytes: $SDXL_OPENVINO_CACHE_MAX_GB (GiB; "inf": no cap) or DEFAULT_MAX_BYTES."""
    raw = os.environ.get(ENV_MAX_GB, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        return parse_gb(raw)
    except ValueError as e:
        raise RuntimeInputError(f"{ENV_MAX_GB}: {e}") from None


# -- locks ----------------------------------------------------------------------------------------------------------
@contextmanager
def lock(path: str | Path, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold an flock on the file `path` (created if missing) while the block runs; yields False only when
    `wait=False` and another holder conflicts. Where locking is not possible (no fcntl, a read-only folder, a file
    system without locks) it yields True without a lock: callers then run as OpenVINO alone would.
    The kernel drops the lock when its holder exits, however it exits; two opens in one process exclude each
    other too (flock locks belong to the open file, not to the process)."""
    if fcntl is None:
        yield True
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except PermissionError:  # another user's lock file: flock works on a read-only open too
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            fd = None
    except OSError:
        fd = None
    if fd is None:
        yield True
        return
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, mode)
        held = True
    except BlockingIOError:
        held = False
    except OSError:  # ENOLCK and the like: no locking on this file system
        held = None
    try:
        yield held is not False
    finally:
        if held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _model_key(model) -> str:
    """A digest of what OpenVINO's cache hash of `model` depends on and is cheap to read: one model (same
    serialization) always gets one key; a path is keyed by nothing (all path compiles take one lock)."""
    h = hashlib.sha256()
    if isinstance(model, ov.Model):
        for port in (*model.inputs, *model.outputs):
            h.update(f"{port.get_partial_shape()}|{port.get_element_type()};".encode())
        h.update(str(len(model.get_ops())).encode())
    else:
        h.update(b"file")
    return h.hexdigest()[:20]


def _cache_dir_for(core: ov.Core, config: dict) -> Path | None:
    cache = config["CACHE_DIR"] if "CACHE_DIR" in config else core.get_property("CACHE_DIR")
    return Path(cache) if str(cache or "") else None


# -- compiling ------------------------------------------------------------------------------------------------------
def compile_model(core: ov.Core, model, device: str = "CPU", config: dict | None = None) -> ov.CompiledModel:
    """core.compile_model(model, device, config), safe for many processes on one model cache: with a cache folder
    (config's CACHE_DIR, else the Core's; "" = no cache, then no lock) the compile holds the folder's shared lock
    and the model's exclusive lock, marks the blobs it uses as just used, and afterwards evicts least recently
    used blobs over the cap (max_bytes_from_env) if no other process is compiling there."""
    config = dict(config or {})
    cache = _cache_dir_for(core, config)
    if cache is None:
        return core.compile_model(model, device, config)
    if "CACHE_DIR" in config:
        config["CACHE_DIR"] = str(cache)
    cap = max_bytes_from_env()  # a bad value fails before the compile
    try:
        (cache / KEY_LOCK_DIR).mkdir(parents=True, exist_ok=True)
    except OSError:  # OpenVINO reports what is wrong with the folder
        return core.compile_model(model, device, config)
    with lock(cache / LOCK_FILE, shared=True), lock(cache / KEY_LOCK_DIR / f"{_model_key(model)}.lock"):
        compiled = core.compile_model(model, device, config)
        _touch_mapped(cache)
    enforce_cap(cache, cap, wait=False)
    return compiled


def _touch_mapped(cache: Path) -> None:
    """Set the access time of the cache files this process has mapped (the blob a cache hit reads stays mapped by
    the compiled model) to now: eviction goes by last use, and relatime file systems update atime once a day."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    root = os.path.realpath(cache)
    now = time.time()
    for path in {parts[5] for parts in (line.split(maxsplit=5) for line in lines) if len(parts) == 6}:
        if os.path.dirname(path) == root and path.endswith(ENTRY_SUFFIXES):  # a deleted one ends " (deleted)"
            try:
                os.utime(path, (now, os.stat(path).st_mtime))
            except OSError:  # gone, or another user's file
                pass


# -- entries, cap, clear --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One cache file: its size, when it was last used (max of atime and mtime, epoch seconds), and whether it
    looks half-written (still writable and modified in the last WRITING_GRACE_S seconds)."""

    path: Path
    bytes: int
    last_used: float
    writing: bool = False


def list_entries(cache_dir: str | Path) -> list[Entry]:
    """The cache files (OpenVINO's *.blob, *.cl_cache) in `cache_dir`, least recently used first ([] if none)."""
    now = time.time()
    entries = []
    try:
        scan = list(os.scandir(cache_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for item in scan:
        if item.name.startswith(".") or not item.name.endswith(ENTRY_SUFFIXES):
            continue
        try:
            st = item.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        writing = bool(st.st_mode & stat.S_IWUSR) and now - st.st_mtime < WRITING_GRACE_S
        entries.append(Entry(Path(item.path), st.st_size, max(st.st_atime, st.st_mtime), writing))
    entries.sort(key=lambda e: (e.last_used, e.path.name))
    return entries


def _remove(entry: Entry) -> bool:
    try:
        entry.path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError:  # not ours to delete: leave it
        return False


def enforce_cap(cache_dir: str | Path, max_bytes: float | None = None, wait: bool = True) -> list[Entry]:
    """Remove least recently used entries until the cache holds at most `max_bytes` (None: max_bytes_from_env();
    math.inf: no cap); returns the removed entries. Holds the folder's exclusive lock, so it waits for (wait=False:
    gives up, returning [], while) any process compiling there; a half-written file is never removed."""
    cap = max_bytes_from_env() if max_bytes is None else max_bytes
    if math.isinf(cap) or not os.path.isdir(cache_dir):
        return []
    entries = list_entries(cache_dir)
    if sum(e.bytes for e in entries) <= cap:
        return []
    removed = []
    with lock(Path(cache_dir) / LOCK_FILE, wait=wait) as held:
        if not held:
            return []
        entries = list_entries(cache_dir)  # again, under the lock
        total = sum(e.bytes for e in entries)
        for entry in entries:
            if total <= cap:
                break
            if not entry.writing and _remove(entry):
                total -= entry.bytes
                removed.append(entry)
    return removed


def _clear(cache_dir: str | Path) -> list[Entry]:
    if not os.path.isdir(cache_dir):
        return []
    with lock(Path(cache_dir) / LOCK_FILE):
        removed = [e for e in list_entries(cache_dir) if _remove(e)]
        # no compile holds a model lock while the folder's lock is exclusive: their files can go
        shutil.rmtree(Path(cache_dir) / KEY_LOCK_DIR, ignore_errors=True)
    return removed


def clear(cache_dir: str | Path) -> int:
    """Remove every cache file in `cache_dir` (waiting for compiles in progress there); returns the bytes freed."""
    return sum(e.bytes for e in _clear(cache_dir))


# -- command line ---------------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    if math.isinf(n):
        return "no cap"
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _count(entries: list) -> str:
    return f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"


def _line(entry: Entry, prefix: str = "") -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used))
    note = "  (being written)" if entry.writing else ""
    return f"{prefix}{when}  {_size(entry.bytes):>10}  {entry.path}{note}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _gb_arg(text: str) -> float:
    try:
        return parse_gb(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        prog="python -m runtime.model_cache",
        description="List, prune or clear the OpenVINO model cache (compiled-model blobs). Entries are listed least "
        "recently used first, the order in which a cap evicts them.",
        epilog=f"environment: {ENV_DIR} (the cache folder), {ENV_MAX_GB} (the cap after each compile, GiB; default "
        f"{DEFAULT_MAX_BYTES // GIB}; 'inf': none)",
    )
    p.add_argument("--dir", type=Path, default=None, help=f"cache folder (default: {default_cache_dir()})")
    sub = p.add_subparsers(dest="command", required=True, metavar="list|clear|prune")
    sub.add_parser("list", help="one line per entry (last used, size, path) and the total")
    sub.add_parser("clear", help="remove every entry")
    prune = sub.add_parser("prune", help="remove least recently used entries down to the cap")
    prune.add_argument("--max-gb", type=_gb_arg, default=None, help=f"the cap in GiB (default: ${ENV_MAX_GB} or 20)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cache = args.dir if args.dir is not None else default_cache_dir()
        if args.dir is not None and not args.dir.is_dir():
            raise RuntimeInputError(f"{args.dir}: {'not a directory' if args.dir.exists() else 'no such directory'}")
        cap = args.max_gb if getattr(args, "max_gb", None) is not None else max_bytes_from_env()
        if args.command == "list":
            removed = []
        elif args.command == "clear":
            removed = _clear(cache)
        else:
            removed = enforce_cap(cache, cap)
        entries = list_entries(cache)
    except RuntimeInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {cache}: {e.strerror or e}", file=sys.stderr)
        return 2
    lines = [_line(e, "removed ") for e in removed] + [_line(e) for e in entries]
    total = f"total: {_count(entries)}, {_size(sum(e.bytes for e in entries))} in {cache} (cap {_size(cap)})"
    if args.command != "list":
        total += f"; removed {_count(removed)}, {_size(sum(e.bytes for e in removed))}"
    print("\n".join([*lines, total]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
