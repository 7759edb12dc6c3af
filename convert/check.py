"""Check a written IR against the torch outputs saved at tracing; sample peak memory. Needs no torch."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov

from convert.errors import ConvertError

# Accepted max |OV - torch| as a fraction of max |torch| (fp32 also gets an absolute 1e-4 floor).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.15, "int4": 0.5}
CHECK_FILE = ".check.npz"
# Checking in f32 needs the weights decompressed to f32 plus the mapped file: above this (the SDXL and refiner
# UNets) the check runs at the device's default precision (bf16 here) to keep the conversion under 12 GB, with a
# tolerance to match: bf16 (8-bit mantissa) through the full-size random-weight SDXL UNet measured 4.7 % of
# max|ref| here, where a conversion error shows as O(100 %).
F32_CHECK_LIMIT = 8 * 2**30
BF16_TOLERANCE = 0.15


class PeakRSS:
    """Samples this process's resident memory in a thread while a submodel is exported (Linux /proc)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def check(name: str, out_dir: Path, weight_format: str, params: int) -> dict:
    """Run the written IR, as the runtime will read it, on the traced inputs; compare with torch's outputs.
    Raises ConvertError outside tolerance (also on NaN)."""
    t0 = time.perf_counter()
    xml = out_dir / "openvino_model.xml"
    data = np.load(out_dir / CHECK_FILE)
    inputs = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
    refs = {k[4:]: data[k] for k in data.files if k.startswith("out:")}
    size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    precision = "f32" if 4 * params + size <= F32_CHECK_LIMIT else None
    core = ov.Core()
    compiled = core.compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": precision} if precision else {})
    got = compiled(inputs)
    diff = max(float(np.abs(got[compiled.output(n)] - r).max()) for n, r in refs.items())
    ref_max = max(float(np.abs(r).max()) for r in refs.values())
    del compiled, got
    (out_dir / CHECK_FILE).unlink()
    rel = TOLERANCE[weight_format] if precision else max(TOLERANCE[weight_format], BF16_TOLERANCE)
    tol = rel * ref_max + (1e-4 if weight_format == "fp32" else 0.0)
    if not diff <= tol:
        raise ConvertError(f"{name}: OpenVINO output differs from torch by {diff:.3e} > tolerance {tol:.3e}")
    return {"max_abs_diff": diff, "ref_max_abs": ref_max, "tolerance": tol, "bytes": size,
            "check_precision": precision or "default", "check_seconds": time.perf_counter() - t0}  # fmt: skip
