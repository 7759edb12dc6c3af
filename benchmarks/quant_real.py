"""The UNet's speed, memory and IR size per weight/activation format, at real size (random weights).

Time and memory do not depend on weight values: the fp16 folders `python -m benchmarks.convert_real --keep` wrote
(benchmarks/out/<model>-random-ov-fp16) give real cost figures. Two stages:

  prepare  calibrate on the folder with the runtime (convert.quantize: the steps the sampler visits), then write
           three UNet IRs beside it: int8 weights only (NNCF INT8_ASYM), int8 weights + activations
           (`--quantize-unet int8`) and optimum-intel's hybrid mode (`--quantize-unet hybrid`);
  time     per-call latency of the UNet at batch 2 (one guided step), each variant in its own child process
           (compile from the model cache, one warm-up call, then timed calls), interleaved in rounds so the
           machine's drift hits every variant alike; peak RSS of each child; IR size.

    python -m benchmarks.quant_real prepare --models segmind-vega ssd-1b sdxl-base-1.0
    python -m benchmarks.quant_real time --models segmind-vega ssd-1b sdxl-base-1.0 --size 512 --rounds 3
    python -m benchmarks.quant_real time --models sdxl-base-1.0 --size 1024 --rounds 1 --calls 2
    python -m benchmarks.quant_real table      # the newest record of each model, size and variant
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.flops import achieved, call_shapes, counted, figures_line, unet_flops_at
from benchmarks.memory import peak_rss_self

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "results" / "quant_real.jsonl"
CACHE = OUT / "ov_cache"
# (variant, IR folder suffix, inference precision)
VARIANTS = [("fp16 IR, f32", None, "f32"), ("fp16 IR, bf16", None, "bf16"), ("int8 weights", "int8w", "bf16"),
            ("hybrid int8", "hybrid", "bf16"), ("int8 W+A", "int8", "bf16")]  # fmt: skip
CALIBRATION_PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "watercolor painting of cherry blossoms over a quiet river",
    "a futuristic city skyline at night with neon signs",
    "a red fox sitting in fresh snow, golden hour",
    "isometric pixel art of a small medieval village",
    "an oil painting of a stormy sea with a lighthouse",
    "a bowl of ramen, food photography",
    "concept art of an alien jungle with glowing plants",
]


def folder(model: str) -> Path:
    return OUT / f"{model}-random-ov-fp16"


def variant_xml(model: str, suffix: str | None) -> Path:
    if suffix is None:
        return folder(model) / "unet" / "openvino_model.xml"
    return OUT / f"{model}-random-unet-{suffix}" / "openvino_model.xml"


def prepare(model: str, size: int, steps: int, resolution: int, modes: list[str]) -> dict:
    from convert import component
    from convert.quantize import Calibration

    src = folder(model)
    if not (src / "model_index.json").is_file():
        sys.exit(f"error: {src} missing: run python -m benchmarks.convert_real --models {model} --keep")
    samples = OUT / f"{model}-calibration.npz"
    cal = Calibration(prompts=CALIBRATION_PROMPTS, size=size, steps=steps, height=resolution, width=resolution)
    facts = {"model": model}
    args = {"model_dir": str(src), "out_file": str(samples), "calibration": cal.__dict__}
    facts["calibrate"] = component.run("calibrate", args, isolate=True)
    print(f"{model}: calibration {facts['calibrate']['samples']} calls, {facts['calibrate']['seconds']:.0f} s, "
          f"peak RSS {facts['calibrate']['peak_rss'] / 2**30:.1f} GiB", flush=True)  # fmt: skip
    for mode in (m for m in ("int8", "hybrid") if m in modes):
        args = {"xml": str(variant_xml(model, None)), "samples": str(samples), "mode": mode,
                "out_xml": str(variant_xml(model, mode))}  # fmt: skip
        r = facts[mode] = component.run("quantize", args, isolate=True)
        print(f"{model}: {mode} {r['ops']} {r['seconds']:.0f} s, peak RSS {r['peak_rss'] / 2**30:.1f} GiB", flush=True)
    if "int8w" in modes:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "benchmarks.quant_real", "_compress", str(variant_xml(model, None)),
                        str(variant_xml(model, "int8w"))], check=True)  # fmt: skip
        facts["int8w"] = {"seconds": time.perf_counter() - t0}
    samples.unlink()
    return facts


def _compress(xml: str, out_xml: str) -> None:
    """Child: the UNet's weights to int8, as `python -m convert --weight-format int8` does."""
    import openvino as ov

    from convert.export import compress

    model = compress(ov.Core().read_model(xml), "int8", unet=True)
    Path(out_xml).parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, out_xml)


def _time(xml: str, precision: str, size: int, calls: int) -> None:
    """Child: compile the UNet for batch 2 at size x size, one warm-up call, `calls` timed calls; JSON out."""
    import numpy as np
    import openvino as ov

    t0 = time.perf_counter()
    core = ov.Core()
    core.set_property({"CACHE_DIR": str(CACHE)})
    model = core.read_model(xml)
    shapes = call_shapes(model, size, size, 2)  # the IR's inputs as the runtime feeds them; the FLOPs' shapes
    names = list(shapes)
    model.reshape(shapes)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    load = time.perf_counter() - t0
    rss_compiled = peak_rss_self()
    rng = np.random.default_rng(0)
    request = compiled.create_infer_request()
    for n in names:
        shape = shapes[n]
        data = np.full(shape, 500.0, np.float32) if n == "timestep" else rng.standard_normal(shape, np.float32)
        request.set_tensor(n, ov.Tensor(data))
    times = []
    for _ in range(calls + 1):
        t = time.perf_counter()
        request.infer()
        times.append(time.perf_counter() - t)
    out = {"load_compile_s": load, "warmup_s": times[0], "calls_s": times[1:], "rss_after_compile": rss_compiled,
           "peak_rss": peak_rss_self()}  # fmt: skip
    print(json.dumps(out))


def ir_bytes(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def time_all(models: list[str], size: int, rounds: int, calls: int, variants: list) -> list[dict]:
    records = {(m, v[0]): {"model": m, "variant": v[0], "precision": v[2], "size": size, "runs": []}
               for m in models for v in variants}  # fmt: skip
    for r in range(rounds):
        for model in models:
            for name, suffix, precision in variants:
                xml = variant_xml(model, suffix)
                if not xml.is_file():  # e.g. int8 W+A of the SDXL UNet: NNCF needs more memory than 24 GB
                    continue
                proc = subprocess.run([sys.executable, "-m", "benchmarks.quant_real", "_time", str(xml), precision,
                                       str(size), str(calls)], capture_output=True, text=True)  # fmt: skip
                if proc.returncode:
                    sys.exit(f"error: timing {model} {name} failed:\n{proc.stderr[-2000:]}")
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                records[(model, name)]["runs"].append(run)
                print(f"round {r + 1}/{rounds} {model:14s} {name:14s} {statistics.median(run['calls_s']):7.2f} s/call"
                      f"  compile {run['load_compile_s']:6.1f} s  peak RSS {run['peak_rss'] / 2**30:5.2f} GiB",
                      flush=True)  # fmt: skip
    out, flops = [], {}
    for (model, name), rec in records.items():
        if not rec["runs"]:
            continue
        suffix = next(v[1] for v in variants if v[0] == name)
        calls_all = [c for run in rec["runs"] for c in run["calls_s"]]
        rec |= {"median_call_s": statistics.median(calls_all), "ir_bytes": ir_bytes(variant_xml(model, suffix))}
        if model not in flops:  # the fp16 IR's count for every variant: the int8 IRs do the same MatMuls and convs
            flops[model] = counted(unet_flops_at, variant_xml(model, None), size, size, 2)  # read, reshaped
        if flops[model]:
            rec |= achieved(flops[model], calls_all)
        rec |= _rss(rec["runs"])
        out.append(rec)
    return out


def _rss(runs: list[dict]) -> dict:
    """Peak RSS of the last round (compiled from the model cache, as the runtime does by default); the first
    round's (a cold compile, which holds more) is kept beside it."""
    return {"peak_rss": runs[-1]["peak_rss"], "rss_after_compile": runs[-1]["rss_after_compile"],
            "peak_rss_first_round": runs[0]["peak_rss"]}  # fmt: skip


def latest_records() -> list[dict]:
    """The newest timing record of each (model, size, variant) in the results file, in first-seen order."""
    out: dict[tuple, dict] = {}
    for line in RESULTS.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "time":
            rec |= _rss(rec["runs"])
            out.pop((rec["model"], rec["size"], rec["variant"]), None)
            out[(rec["model"], rec["size"], rec["variant"])] = rec
    return sorted(out.values(), key=lambda r: (r["size"], r["model"], [v[0] for v in VARIANTS].index(r["variant"])))


def table(records: list[dict]) -> str:
    lines = ["| model | size | variant | s/call (median) | vs bf16 | vs f32 | peak RSS | RSS vs bf16 | IR size "
             "| GFLOP/call | achieved GFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by = {(r["model"], r["size"], r["variant"]): r for r in records}
    for r in records:
        bf16 = by.get((r["model"], r["size"], "fp16 IR, bf16"))
        f32 = by.get((r["model"], r["size"], "fp16 IR, f32"))
        sp = f"{bf16['median_call_s'] / r['median_call_s']:.2f}x" if bf16 else "-"
        sp32 = f"{f32['median_call_s'] / r['median_call_s']:.2f}x" if f32 else "-"
        rss = f"{r['peak_rss'] / bf16['peak_rss'] * 100:.0f} %" if bf16 else "-"
        fl = (f"{r['unet_gflop_per_call']:.0f} | {r['unet_achieved_gflops']:.0f}" if "unet_achieved_gflops" in r
              else "- | -")  # fmt: skip
        lines.append(f"| {r['model']} | {r['size']} | {r['variant']} | {r['median_call_s']:.2f} | {sp} | {sp32} | "
                     f"{r['peak_rss'] / 2**30:.2f} GiB | {rss} | {r['ir_bytes'] / 2**30:.2f} GiB | {fl} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_compress":
        _compress(*argv[1:3])
        return 0
    if argv and argv[0] == "_time":
        _time(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_real", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("stage", choices=["prepare", "time", "table"], help="table: the newest records as markdown")
    p.add_argument("--models", nargs="+", default=["segmind-vega", "ssd-1b", "sdxl-base-1.0"])
    p.add_argument("--size", type=int, default=512, help="image size of the timed calls (latent size / 8)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=3, help="timed calls per child, after one warm-up call")
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS])
    p.add_argument("--modes", nargs="+", default=["int8", "hybrid", "int8w"], help="prepare: the IRs to write")
    p.add_argument("--calibration-size", type=int, default=8)
    p.add_argument("--calibration-steps", type=int, default=8)
    p.add_argument("--calibration-resolution", type=int, default=512)
    args = p.parse_args(argv)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.stage == "table":
        print(table(latest_records()))
        return 0
    env = {"openvino": _version("openvino"), "nncf": _version("nncf"), "cpu": platform.processor() or "cpu",
           "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    if args.stage == "prepare":
        for model in args.models:
            facts = prepare(
                model, args.calibration_size, args.calibration_steps, args.calibration_resolution, args.modes
            )
            with RESULTS.open("a") as f:
                f.write(json.dumps({"stage": "prepare", **env, **facts}) + "\n")
        return 0
    variants = [v for v in VARIANTS if v[0] in args.variants]
    from benchmarks.machine import matmul_gflops

    env["matmul_gflops"] = matmul_gflops()  # the day's speed, next to the absolute times
    records = time_all(args.models, args.size, args.rounds, args.calls, variants)
    with RESULTS.open("a") as f:
        for rec in records:
            f.write(json.dumps({"stage": "time", **env, **rec}) + "\n")
    print(table(records))
    if any("unet_flops_method" in r for r in records):
        print(f"FLOPs per call: {next(r for r in records if 'unet_flops_method' in r)['unet_flops_method']}")
    for rec in (r for r in records if "unet_achieved_gflops" in r):
        print(f"{rec['model']} {rec['variant']}: {figures_line(rec)}")
    return 0


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    sys.exit(main())
