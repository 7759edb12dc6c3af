"""The UNet's compile: seconds and peak RSS against the interval at which the runtime drops the IR's mapped pages.

    python -m benchmarks.compile_memory FOLDER [--intervals 0.5 0.1 0.05] [--size 512] [--batch 2 1] [--rounds 2]

Each configuration compiles in a child of its own (a peak RSS is a process's high-water mark), rounds interleaved;
0 = no dropping. The runtime compiles with runtime.ov_model._DropPagesWhile, as here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.memory import peak_rss_self


def child(folder: str, interval: float, size: int, batch: int) -> dict:
    import contextlib

    import openvino as ov

    from benchmarks.flops import call_shapes
    from runtime.ov_model import _DropPagesWhile

    xml = Path(folder) / "unet" / "openvino_model.xml"
    core = ov.Core()
    model = core.read_model(xml)
    model.reshape(call_shapes(xml, size, size, batch))
    drop = _DropPagesWhile(xml.with_suffix(".bin"), interval=interval) if interval > 0 else contextlib.nullcontext()
    t = time.perf_counter()
    with drop:
        core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    return {"compile_s": time.perf_counter() - t, "peak_rss": peak_rss_self()}


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["_child"]:
        print(json.dumps(child(*json.loads(sys.argv[2]))))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--intervals", type=float, nargs="+", default=[0.5, 0.1, 0.05])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=[2])
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    if not (a.folder / "unet" / "openvino_model.xml").is_file():
        p.error(f"{a.folder}: no unet/openvino_model.xml there")
    if any(i < 0 for i in a.intervals) or a.rounds < 1 or a.size % 8 or any(b < 1 for b in a.batch):
        p.error("intervals >= 0, rounds >= 1, batch >= 1, size a multiple of 8")
    seen: dict[tuple, list[dict]] = {}
    configs = [(i, b) for i in a.intervals for b in a.batch]
    for r in range(a.rounds):
        for interval, batch in configs if r % 2 == 0 else configs[::-1]:
            spec = json.dumps([str(a.folder), interval, a.size, batch])
            cmd = [sys.executable, "-m", "benchmarks.compile_memory", "_child", spec]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"error: {(proc.stderr.strip().splitlines() or ['the child failed'])[-1]}", file=sys.stderr)
                return 1
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            seen.setdefault((interval, batch), []).append(rec)
            print(f"round {r + 1}: interval {interval} s, batch {batch}: compile {rec['compile_s']:.1f} s, "
                  f"peak RSS {rec['peak_rss'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    print("| drop interval | batch | compile s | peak RSS GiB |\n|---|---|---|---|")
    for (interval, batch), recs in seen.items():
        secs = [x["compile_s"] for x in recs]
        peaks = [x["peak_rss"] / 2**30 for x in recs]
        print(f"| {interval or 'none'} | {batch} | {statistics.median(secs):.1f} ({min(secs):.1f}-{max(secs):.1f}) "
              f"| {min(peaks):.2f}-{max(peaks):.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
