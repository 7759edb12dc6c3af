"""Peak resident memory (RSS): the one way the benchmarks measure it, of this process or of a child.

Both read the kernel's high-water mark of the resident set (getrusage's ru_maxrss, the VmHWM of
/proc/PID/status), which survives the memory being freed: a peak, not the current RSS.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def peak_rss_self() -> int:
    """This process's peak RSS so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _UNIT


def run_measured(cmd: list[str], **popen_kwargs) -> tuple[float, int, int]:
    """Run a child to its end -> (wall seconds, its own peak RSS in bytes, exit code).

    The peak is that child's (and its waited-for descendants'), from os.wait4: RUSAGE_CHILDREN would give
    the largest peak of every child this process has waited for so far."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C: do not leave the child running
        proc.kill()
        proc.wait()
        raise
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return seconds, usage.ru_maxrss * _UNIT, proc.returncode
