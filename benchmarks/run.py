"""Benchmark harness: per-stage medians of our pipeline, the bound (pure model-call time), anchors side by side.

    python -m benchmarks.run --model DIR [--steps 20] [--height H] [--width W] [--precision f32|bf16]
        [--runs N] [--warmup 1] [--out benchmarks/out/run-<timestamp>] [--against genai,diffusers,optimum]
        [--diffusers-source DIR] [--optimum-python PATH]

Every run of every pipeline is a child process (its own peak RSS, no state shared between pipelines), and the
runs are interleaved (ours, anchor 1, anchor 2, ours, ...) so that the machine's noise falls on all of them.
Ours: benchmarks.timing (through the runtime's public API); the anchors: benchmarks.anchors; the tables and
the chart: benchmarks.report. Next to the day's MatMul GFLOP/s, each run of ours records the UNet's FLOPs per call
(benchmarks.flops, from the IR at the call's shapes) and its achieved GFLOP/s (FLOPs / median UNet call). The
children start in this checkout's root, whatever the current folder: run `python -m benchmarks.run` where
`benchmarks` imports (the root, or with it on PYTHONPATH), or `python path/to/benchmarks/run.py` from anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import traceback
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: import this checkout's packages, whatever the current folder
    sys.path.insert(0, str(ROOT))

from benchmarks import anchors, report, strategy  # noqa: E402
from benchmarks.flops import achieved, counted, figures_line, unet_flops, unet_xml  # noqa: E402
from benchmarks.summary import summarize  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"
MARK = "@@BENCH@@ "
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
             "amx_bf16", "amx_int8")  # fmt: skip


class UsageError(Exception):
    pass


def worker(arm: str):
    """The function a child runs for `arm`: ours (and the shape discovery before the runs) or an anchor."""
    if arm in ("ours", "ours-shapes"):
        from benchmarks import timing

        return timing.measure if arm == "ours" else timing.discover
    return anchors.WORKERS[arm]


def run_child(arm: str, spec: dict, python: str) -> dict:
    """One measurement in a child process (started in the checkout's root); its result or {"error": ...}."""
    cmd = [python, "-m", "benchmarks.run", "--worker", arm, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            result = json.loads(line[len(MARK) :])
            if "error" in result:  # the child's traceback, for the one who reads the log
                sys.stderr.write(proc.stderr)
            return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


def cpu_info() -> dict:
    flags, name = set(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and name is None:
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": name or platform.processor(), "cores": os.cpu_count(),
            "cpu_flags": sorted(f for f in flags if f in CPU_FLAGS)}  # fmt: skip


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="converted OpenVINO model folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--precision", choices=["f32", "bf16"])
    p.add_argument("--device", default="CPU")
    p.add_argument("--guidance-scale", type=float, help="default: the folder's preset (5 for SDXL)")
    strategy.add_flags(p.add_argument_group("compute less per image (our pipeline only; the anchors run plain)"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matmul", type=int, default=4096, help="the day's speed: an N^3 MatMul's GFLOP/s in the records")
    p.add_argument("--out", help="output folder (default benchmarks/out/run-<timestamp>)")
    p.add_argument("--against", default="genai,diffusers,optimum",
                   help="anchors, comma separated: genai (runs genai with dynamic shapes and genai-static), "
                        "genai-static, optimum (runs optimum-intel dynamic and optimum-static), optimum-static, "
                        "diffusers; 'none' for ours only")  # fmt: skip
    p.add_argument("--diffusers-source", help="the diffusers folder the model was converted from")
    p.add_argument("--optimum-python", help="a Python interpreter with optimum-intel installed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def validate(args) -> tuple[list[str], dict]:
    """-> (the anchors asked for, the children's spec); UsageError with a one-line reason otherwise."""
    if not args.model:
        raise UsageError("--model DIR is required")
    model = Path(args.model).resolve()  # the children start elsewhere: every path absolute
    for rel in ("model_index.json", "unet/openvino_model.xml", "unet/config.json", "vae_decoder/config.json"):
        if not (model / rel).is_file():
            raise UsageError(f"{args.model}: not a converted SDXL model folder (no {rel})")
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be at least 1")
    if args.runs < 1 or args.warmup < 0:
        raise UsageError("--runs must be at least 1 and --warmup at least 0")
    for k in ("height", "width"):
        v = getattr(args, k)
        if v is not None and (v <= 0 or v % 8):
            raise UsageError(f"--{k} {v}: must be a positive multiple of 8")
    arms = []
    for a in (x.strip() for x in args.against.split(",")):
        if a in ("", "none"):
            continue
        pair = {"genai": ("genai", "genai-static"), "optimum": ("optimum", "optimum-static")}
        for arm in pair.get(a, (a,)):
            if arm not in anchors.NAMES:
                raise UsageError(f"--against {a!r}: choose from {', '.join(anchors.NAMES)}, none")
            if arm not in arms:
                arms.append(arm)
    from runtime.errors import RuntimeInputError
    from runtime.params import ModelInfo

    try:
        info = ModelInfo.load(model)
    except RuntimeInputError as e:
        raise UsageError(str(e)) from None
    guidance = args.guidance_scale
    if guidance is None:
        guidance = info.presets(None, args.steps, None)["guidance_scale"]
    if args.diffusers_source:
        args.diffusers_source = str(Path(args.diffusers_source).resolve())
    if args.optimum_python and os.sep in args.optimum_python:  # a path (a bare name is looked up in PATH)
        args.optimum_python = str(Path(args.optimum_python).absolute())
    chosen = strategy.chosen(args)
    if chosen:  # the runtime's own checks, one line each, before any child starts
        from runtime.params import GenerationParams

        try:
            GenerationParams.create(prompt=PROMPT, num_inference_steps=args.steps, **chosen)
        except (RuntimeInputError, TypeError, ValueError) as e:
            raise UsageError(str(e).splitlines()[0]) from None
    spec = dict(model=str(model), device=args.device, precision=args.precision, steps=args.steps, prompt=PROMPT,
                height=args.height or info.default_size, width=args.width or info.default_size,
                guidance_scale=guidance, diffusers_source=args.diffusers_source, strategy=chosen)  # fmt: skip
    return arms, spec


def measure_runs(args, spec: dict, arms: list[str], emit) -> dict[str, str] | None:
    """The interleaved runs of every arm, each record handed to `emit`; -> the anchors that failed (and why),
    None when ours failed (reported on stderr)."""
    found = run_child("ours-shapes", spec, sys.executable)
    if "error" in found:
        print(f"error: our pipeline failed: {found['error']}", file=sys.stderr)
        return None
    spec = {**spec, "shapes": found["shapes"]}
    # the UNet's FLOPs per call at the shapes of its calls (IR read and reshaped, not compiled)
    flops = counted(unet_flops, unet_xml(spec["model"]), found["shapes"]["unet"][0])
    failed: dict[str, str] = {}
    for run in range(args.warmup + args.runs):
        warm = run < args.warmup
        for arm in arms:
            if arm in failed:
                continue
            python = args.optimum_python if arm.startswith("optimum") else sys.executable
            res = run_child(arm, spec, python)
            if "error" in res:
                if arm == "ours":
                    print(f"error: our pipeline failed: {res['error']}", file=sys.stderr)
                    return None
                failed[arm] = res["error"]
                emit({"kind": "anchor", "arm": arm, "status": f"failed: {res['error']}"})
                continue
            rec = {"kind": "measurement", "arm": arm, "run": run, "warmup": warm}
            for stage, seconds in res["stages"].items():
                emit({**rec, "stage": stage, "seconds": seconds})
            emit({**rec, "stage": "peak_rss", "bytes": res["peak_rss_bytes"]})
            if "detail" in res:
                if arm == "ours" and flops:  # next to the day's MatMul GFLOP/s: the UNet's achieved GFLOP/s
                    res["detail"] |= achieved(flops, res["detail"]["unet_full_calls"])
                emit({"kind": "detail", "arm": arm, "run": run, "warmup": warm, **res["detail"]})
            print(f"run {run}{' (warm-up)' if warm else ''} {arm}: end to end {res['stages']['end_to_end']:.4f} s"
                  + (f"; {figures_line(res['detail'])}" if arm == "ours" and flops else ""))  # fmt: skip
    return failed


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:  # a child: measure one pipeline once, print one marked JSON line
        try:
            result = worker(args.worker)(json.loads(args.spec))
        except Exception as e:  # reported by the parent, in the table; the traceback goes to the child's stderr
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        print(MARK + json.dumps(result), flush=True)
        return 0
    try:
        arms, spec = validate(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "benchmarks" / "out" / f"run-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)

    status = {arm: anchors.availability(arm, args.diffusers_source, args.optimum_python) for arm in arms}
    records = []
    with open(out / "records.jsonl", "w") as log:

        def emit(rec):
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()

        from benchmarks.machine import matmul_gflops

        machine = matmul_gflops(args.matmul)  # the day's speed, next to every absolute time of this run
        bf16, f32 = machine["openvino_bf16"], machine["openvino_f32"]
        print(f"matmul {args.matmul}^3: OpenVINO {bf16:.0f} bf16 / {f32:.0f} f32 GFLOP/s")
        if spec["strategy"]:
            print("ours: " + " ".join(f"{k}={v}" for k, v in spec["strategy"].items()) + " (the anchors: plain)")
        emit({"kind": "machine", "matmul_size": args.matmul, "matmul_gflops": machine})
        for arm, why in status.items():
            if why:
                print(f"{arm}: skipped: {why}")
                emit({"kind": "anchor", "arm": arm, "status": f"skipped: {why}"})
        ran = ["ours"] + [a for a in arms if status[a] is None]
        failed = measure_runs(args, spec, ran, emit)
        if failed is None:
            return 1
        summary, text, bars = summarize(records, spec, args, status, failed, cpu_info())
        if spec["strategy"]:
            summary["strategy"] = spec["strategy"]
            shown = " ".join(f"{k}={v}" for k, v in spec["strategy"].items())
            text = f"Ours with {shown}; the anchors run plain.\n\n" + text
        mine = [r for r in records if r["kind"] == "detail" and r["arm"] == "ours" and not r["warmup"]]
        if mine and "unet_gflop_per_call" in mine[0]:  # over every measured run's UNet calls
            per_call = {"gflop": mine[0]["unet_gflop_per_call"], "method": mine[0]["unet_flops_method"]}
            summary |= achieved(per_call, [c for r in mine for c in r["unet_full_calls"]])
            text += f"\n{figures_line(summary)}; MatMul {bf16:.0f} bf16 / {f32:.0f} f32 GFLOP/s\n"
        emit(summary)
    (out / "table.md").write_text(text)
    report.draw_chart(
        out / "stages.png", bars, f"per-stage medians (s): {Path(spec['model']).name}, {args.steps} steps"
    )
    print(text, end="")
    print(f"written: {out / 'records.jsonl'}, {out / 'table.md'}, {out / 'stages.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
