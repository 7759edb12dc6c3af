"""What keeps a conversion from destroying data: inputs never inside OUTPUT (nor OUTPUT inside an input), one
conversion at a time per OUTPUT (a lock file beside it), and a final move that replaces nothing it did not check.

The final move, on Linux: renameat2(RENAME_NOREPLACE) puts the finished folder at OUTPUT only if nothing is there
(os.rename would silently replace an empty folder); with --overwrite, renameat2(RENAME_EXCHANGE) swaps the finished
folder and the old OUTPUT in one step, so that OUTPUT is never missing, and the old one, left under the temporary
name, is removed. Where renameat2 is not available (another OS, a filesystem without it): a check and a rename under
the lock, and for --overwrite the old OUTPUT is moved to `.OUTPUT.old-PID` first; a conversion killed between the
two renames leaves it there, and the next one puts it back (runtime.leftovers.cleanup_stale).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from convert.errors import ConvertError

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100


def beside(output: str | Path) -> Path:
    """The real folder OUTPUT is in, where its lock file, temporary folder and leftovers go (OUTPUT itself may be a
    symlink: it is the link that is replaced, not what it points to)."""
    return Path(os.path.realpath(Path(output).absolute().parent))


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _inside(inner: Path, outer: Path) -> bool:
    """inner is outer or lies under it (both real paths)."""
    return inner == outer or outer in inner.parents


def check_paths(source: str, output: str | Path, config: str | None = None, inputs: list | tuple = ()) -> None:
    """Refuse an OUTPUT that is, or lies inside, the source or the --config folder, and inputs inside OUTPUT
    (--overwrite would delete them; a folder converted into its own source has its weights replaced). inputs:
    (what, path) of other files the conversion reads, e.g. ("the LoRA", path). Symlinks are followed; paths that
    do not exist (hub ids) are skipped."""
    out = _real(output)
    for what, path in [("the source", source), ("the --config folder", config), *inputs]:
        if path is None or not os.path.lexists(path):
            continue
        real, shown = _real(path), f"{what} {path}"
        if real == out:
            raise ConvertError(f"{output} is {shown}; choose another OUTPUT folder (--overwrite would delete it)")
        if _inside(out, real):
            raise ConvertError(f"{output} is inside {shown}; choose an OUTPUT folder outside it")
        if _inside(real, out):
            raise ConvertError(f"{shown} is inside {output}; choose another OUTPUT folder (--overwrite would "
                               "delete it)")  # fmt: skip
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ConvertError(f"{output} exists and is not a folder; OUTPUT is the model folder to write")


class OutputLock:
    """An exclusive flock on `.OUTPUT.lock` beside OUTPUT, held for the whole conversion (the file is removed when
    released). A second conversion to the same OUTPUT fails at once instead of replacing the first's folder."""

    def __init__(self, output: str | Path, wait: bool = False):
        """wait: block until another conversion to OUTPUT ends (e.g. test fixtures sharing a cache) instead of
        failing; convert_pipeline never waits."""
        output = Path(output)
        parent = beside(output)
        if not parent.is_dir():
            raise ConvertError(f"{output}: parent folder {parent} does not exist")
        self.output, self.path, self.fd = output, parent / f".{output.name}.lock", None
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock, the final move still replaces nothing unchecked
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConvertError(f"{output}: cannot write there ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                by = f" (process {holder})" if holder.isdigit() else ""
                raise ConvertError(f"{output} is being written by another conversion{by}; wait for it to end or "
                                   f"choose another OUTPUT (lock file {self.path})") from None  # fmt: skip
            try:  # its last holder may have removed the file between our open and our lock: lock the new one
                same = os.path.samestat(os.stat(self.path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) -> True; False where the OS or the filesystem lacks it (or this flag); OSError otherwise."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


# test hook: called between the two renames of the fallback --overwrite (where a kill leaves no OUTPUT)
between_renames: Callable[[], None] | None = None


def move_into_place(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished folder tmp to OUTPUT (under OutputLock). Without overwrite, fail if anything appeared
    at OUTPUT meanwhile (an empty folder too); with it, replace OUTPUT without a moment where it is missing."""
    tmp, output = Path(tmp), Path(output)
    appeared = (f"{output} appeared while converting (created by something else); left untouched, nothing written "
                "(pass --overwrite to replace it)")  # fmt: skip
    if not overwrite or not os.path.lexists(output):
        try:
            if not _renameat2(tmp, output, RENAME_NOREPLACE):
                if os.path.lexists(output):  # no renameat2: check and rename, under the lock
                    raise FileExistsError(errno.EEXIST, "exists", str(output))
                os.rename(tmp, output)
        except FileExistsError:
            if not overwrite:
                raise ConvertError(appeared) from None
            move_into_place(tmp, output, overwrite)  # appeared just now: replace it as asked
        return
    if _renameat2(tmp, output, RENAME_EXCHANGE):  # tmp now holds the old OUTPUT
        _remove(tmp)
        return
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    _remove(old)
    os.rename(output, old)
    if between_renames is not None:
        between_renames()
    os.rename(tmp, output)
    _remove(old)
