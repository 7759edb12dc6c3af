"""Images/s of `runtime.batch`: one local process against Ray Data with 1 and with 2 actors of 1 CPU each on a
2-CPU `ray start --head` bound to 127.0.0.1 (runtime.ray_cluster.HeadNode). Every run is the real command in a
child process, from start to exit (Ray's connect and actor start-up included), after a warm-up run that fills
the OpenVINO model cache; "steady" counts from the first finished image to the last (manifest `finished`).

    python -m benchmarks.batch_ray [--model DIR] [--size 64] [--steps 2] [--prompts 12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(model: str, prompts: Path, out: Path, flags: list[str], extra: list[str]) -> tuple[float, float, int]:
    cmd = [sys.executable, "-m", "runtime.batch", "--model", model, "--prompts", str(prompts), "--out", str(out),
           *flags, *extra, "--quiet"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    done = sorted(e["finished"] for e in entries)
    steady = (len(done) - 1) / (done[-1] - done[0]) if done[-1] > done[0] else float("nan")
    return len(entries) / wall, steady, len({e["worker"] for e in entries})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the tests' tiny SDXL")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=12)
    args = ap.parse_args(argv)
    from runtime.ray_cluster import HeadNode

    if args.model is None:
        from tests import models

        args.model = str(models.ov_dir("base"))
    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    try:
        prompts = work / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(args.prompts)))
        flags = ["--height", str(args.size), "--width", str(args.size), "--steps", str(args.steps),
                 "--precision", "f32", "--cache-dir", str(work / "cache")]  # fmt: skip
        _run(args.model, prompts, work / "warm-up", flags, [])
        print(f"{args.prompts} prompts, {args.size}x{args.size}, {args.steps} steps, f32")
        rate, steady, _ = _run(args.model, prompts, work / "local", flags, [])
        print(f"local, 1 process (OpenVINO's default threads): {rate:.2f} images/s end to end, {steady:.2f} steady")
        with HeadNode(num_cpus=2) as head:
            for n in (1, 2):
                ray = ["--ray", head.address, "--ray-actors", str(n), "--ray-cpus-per-actor", "1"]
                rate, steady, workers = _run(args.model, prompts, work / f"ray-{n}", flags, ray)
                print(f"Ray Data, {n} actor(s) x 1 CPU: {rate:.2f} images/s end to end, {steady:.2f} steady "
                      f"({workers} worker(s) made images)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
