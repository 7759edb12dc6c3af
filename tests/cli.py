"""Running the CLIs in a child process, as users do, and checking their one-line errors."""

from __future__ import annotations

import subprocess
import sys

from tests.models import ROOT


def run(module: str, *args, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *(str(a) for a in args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    """Exit code 2, exactly one `error:` line naming the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
