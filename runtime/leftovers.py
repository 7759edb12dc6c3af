"""Leftovers of writers that were killed half-way, beside the file or folder NAME they were writing.

A writer puts what it writes at `.NAME.partial-PID` (its process id) and renames it to NAME when complete; one that
replaces NAME may first move the old NAME to `.NAME.old-PID`. When the process dies in between, those stay behind;
`cleanup_stale` removes the ones whose process is gone (never a live one's), and puts a dead writer's `.NAME.old-PID`
back at NAME when NAME is missing (the writer was killed between moving the old one away and putting the new one in).
Standard library only, so that the runtime's writers can use it too.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True unless no process has this id (this process counts as alive; a process of another user too)."""
    if pid <= 0:
        return True  # not a process id we wrote: leave it alone
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def leftovers(folder: Path, name: str) -> list[tuple[Path, str, int]]:
    """(path, "partial" | "old", pid) for every `.NAME.partial-PID` / `.NAME.old-PID` in folder (also with a
    suffix after the PID, e.g. `.NAME.partial-PID.quantize`), live or dead."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(partial|old)-(\d+)(\.[^/]*)?")
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    found = []
    for entry in sorted(entries):
        m = pattern.fullmatch(entry.name)
        if m:
            found.append((entry, m[1], int(m[2])))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def cleanup_stale(folder: Path, name: str) -> list[str]:
    """Remove the leftovers of dead writers of folder/NAME; first, when NAME is missing, rename the newest dead
    `.NAME.old-PID` back to NAME. -> one line per thing done (for a log). Live writers' leftovers are kept."""
    folder = Path(folder)
    dead = [(path, kind, pid) for path, kind, pid in leftovers(folder, name) if not pid_alive(pid)]
    done = []
    target = folder / name
    olds = [path for path, kind, pid in dead if kind == "old" and path.name == f".{name}.old-{pid}"]
    if olds and not os.path.lexists(target):
        newest = max(olds, key=lambda p: p.lstat().st_mtime)
        try:
            os.rename(newest, target)
            done.append(f"restored {target} from {newest.name} (its writer was killed while replacing it)")
        except OSError:
            pass
    for path, _, pid in dead:
        if os.path.lexists(path):
            _remove(path)
            done.append(f"removed {path} (left by process {pid}, which is gone)")
    return done
