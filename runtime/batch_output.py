"""runtime.batch's output folder: each image written once, atomically, and a manifest that a re-run resumes from.

An image goes to `.NAME.partial-PID`, is flushed to disk and renamed to NAME; then one JSON line is appended to
`manifest.jsonl` (one write of the whole line, then fsync). A run killed at any point leaves: partial files of
a dead process (removed by runtime.leftovers.cleanup_stale), an image without its manifest line (made again: the
same bytes), or a torn last manifest line (cut off). A line counts as done when the manifest names its file and
the file is there with the recorded size. Only one run writes to a folder at a time (an flock on `.batch.lock`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np

from runtime.errors import RuntimeInputError
from runtime.leftovers import cleanup_stale
from runtime.model_cache import lock

MANIFEST = "manifest.jsonl"
LOCK = ".batch.lock"


class BatchFailed(Exception):
    """The run failed after it started (a stuck Ray plan, a worker that cannot load the model): one line, exit 1."""


def png_bytes(image: np.ndarray, parameters: dict) -> bytes:
    """The PNG file runtime.image.save_png writes for this image and parameters (same encoder, same chunks)."""
    from PIL import Image

    from runtime.image import png_info, png_text

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=png_info(png_text(parameters)))
    return buf.getvalue()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """path's content becomes `data` whole or not at all, also across a kill -9 or a power cut."""
    cleanup_stale(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")  # the name runtime.leftovers knows
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class Output:
    """The output folder of one batch run: `done` maps each finished file name to its manifest entry."""

    def __init__(self, folder: Path, names: list[str]):
        self.folder = folder
        self.manifest = folder / MANIFEST
        self.done: dict[str, dict] = {}
        self.notes: list[str] = []  # what resuming repaired, one line each
        self._stack = contextlib.ExitStack()
        self._fd: int | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RuntimeInputError(f"--out {folder}: cannot create it ({e.strerror or e})") from None
        if not folder.is_dir():
            raise RuntimeInputError(f"--out {folder}: not a folder")
        if not self._stack.enter_context(lock(folder / LOCK, wait=False)):
            raise RuntimeInputError(f"--out {folder}: another batch run is writing there")
        try:
            for name in [*names, MANIFEST]:
                self.notes += cleanup_stale(folder, name)
            self._recover()
            self._fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            self.close()
            raise RuntimeInputError(f"--out {folder}: {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise

    def _recover(self) -> None:
        """Read the manifest; keep one entry per file whose image is complete; rewrite it when anything was cut."""
        if not self.manifest.exists():
            return
        raw = self.manifest.read_bytes()
        lines = raw.split(b"\n")
        torn = lines.pop() if lines else b""  # the text after the last newline: a line cut by a kill
        entries: dict[str, dict] = {}
        dropped = 0
        for line in lines:
            try:
                entry = json.loads(line)
                name = entry["file"]
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            path = self.folder / str(name)
            if "/" in str(name) or not path.is_file() or path.stat().st_size != entry.get("bytes"):
                dropped += 1  # its image is gone or not the one written: it is made again
                continue
            if name in entries:
                dropped += 1
            entries[name] = entry
        self.done = entries
        if torn or dropped:
            what = [f"a torn last line ({len(torn)} bytes)"] if torn else []
            what += [f"{dropped} line(s) without their image or repeated"] if dropped else []
            self.notes.append(f"{self.manifest}: repaired {' and '.join(what)}")
            text = "".join(json.dumps(e) + "\n" for e in entries.values())
            write_atomic(self.manifest, text.encode())

    def add(self, name: str, data: bytes, entry: dict) -> dict:
        """Write one image, then its manifest line (fields of `entry` plus file and bytes)."""
        write_atomic(self.folder / name, data)
        entry = {**entry, "file": name, "bytes": len(data)}
        line = (json.dumps(entry) + "\n").encode()
        written = os.write(self._fd, line)  # O_APPEND: one write of the whole line
        if written != len(line):
            raise OSError(f"short write to {self.manifest}")
        os.fsync(self._fd)
        self.done[name] = entry
        return entry

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._stack.close()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
