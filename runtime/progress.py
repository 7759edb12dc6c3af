"""The CLI's progress line: stages and denoising steps on one terminal line of stderr."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


class Progress:
    """Stages and denoising steps on one terminal line of stderr: elapsed time, ETA, and it/s counted over the
    denoising steps only (set-up, compiles and the refiner's encode are left out). Off when disabled (--quiet,
    or stderr not a terminal)."""

    def __init__(self, enabled: bool, stream=None, clock=time.perf_counter):
        self.enabled, self.stream, self.clock = enabled, stream or sys.stderr, clock
        self.t0 = clock()
        self.denoise_seconds = 0.0  # in the denoise stage, before the current stretch
        self._denoise_since: float | None = None
        self._open = False  # a line without its newline yet

    def _write(self, text: str) -> None:
        self.stream.write(f"\r\033[K{text}")
        self.stream.flush()
        self._open = True

    def stage(self, name: str) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self._denoise_since is not None:
            self.denoise_seconds += now - self._denoise_since
            self._denoise_since = None
        if name == "denoise":
            self._denoise_since = now
        self._write(f"{name} ...  {_clock(now - self.t0)}")

    def step(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        denoising = self.denoise_seconds + (now - self._denoise_since if self._denoise_since is not None else 0.0)
        rate = done / denoising if denoising > 0 else 0.0
        eta = _clock((total - done) / rate) if rate > 0 else "?"
        bar = "#" * int(30 * done / total)
        self._write(f"denoise [{bar:<30s}] {done}/{total}  {_clock(now - self.t0)} elapsed, ETA {eta}  {rate:.2f} it/s")

    def note(self, text: str) -> None:
        """A line that stays (the random seed, a warning), written even when progress is off."""
        if self.enabled and self._open:
            self.stream.write("\r\033[K")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._open:
            self.stream.write(f"\r\033[Kdone in {_clock(self.clock() - self.t0)}\n")
            self.stream.flush()
            self._open = False
