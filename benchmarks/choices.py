"""What each of the runtime's choices gains: per-call time of each model under each choice, side by side.

    python -m benchmarks.choices --model DIR [--size 512] [--rounds 3] [--calls 5] [--only unet vae_decoder ...]

The choices the runtime makes, each against what it would cost otherwise:
- static shapes (reshape to the call's shapes before compiling) against dynamic shapes;
- one batch-2 UNet call per guided step against two batch-1 calls;
- zero-copy tensors (inputs set once as shared memory, the output read in place) against the copying
  `infer(dict)` + `.copy()` path;
- the inference precision per model (bf16 where the CPU has it, f32 otherwise), with its accuracy: the VAE
  decoder's image PSNR and the text encoders' and UNet's relative error against f32 on the same inputs;
- the thread settings: LATENCY hint with all cores in one stream (OpenVINO's default here) against one thread,
  the THROUGHPUT hint and no CPU pinning.

Every variant runs in its own child process (compile, one untimed call, then --calls timed calls); variants are
interleaved in --rounds rounds so that the machine's drift falls on all of them; the table gives the median
per-call seconds and the ratio to the runtime's choice. Accuracy is measured once, in one process (it does not
depend on the machine's noise). Results are appended to --results (benchmarks/results/choices.jsonl).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.flops import achieved, counted, figures_line, unet_flops_at
from benchmarks.memory import peak_rss_self

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "choices.jsonl"
MARK = "@@CHOICE@@ "
now = time.perf_counter

# (component, variant, the runtime's own choice?, compile config, call mode)
VARIANTS = [
    ("unet", "bf16, static, batch 2, zero-copy (ours)", True, {"INFERENCE_PRECISION_HINT": "bf16"}, "static"),
    ("unet", "dynamic shapes", False, {"INFERENCE_PRECISION_HINT": "bf16"}, "dynamic"),
    ("unet", "two batch-1 calls per step", False, {"INFERENCE_PRECISION_HINT": "bf16"}, "b1x2"),
    ("unet", "copying infer(dict) + copy out", False, {"INFERENCE_PRECISION_HINT": "bf16"}, "copy"),
    ("unet", "f32", False, {"INFERENCE_PRECISION_HINT": "f32"}, "static"),
    ("unet", "1 thread", False, {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 1}, "static"),
    ("unet", "THROUGHPUT hint", False, {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "THROUGHPUT"},
     "static"),
    ("unet", "no CPU pinning", False, {"INFERENCE_PRECISION_HINT": "bf16", "ENABLE_CPU_PINNING": False}, "static"),
    ("vae_decoder", "bf16, static (ours)", True, {"INFERENCE_PRECISION_HINT": "bf16"}, "static"),
    ("vae_decoder", "f32", False, {"INFERENCE_PRECISION_HINT": "f32"}, "static"),
    ("vae_decoder", "dynamic shapes", False, {"INFERENCE_PRECISION_HINT": "bf16"}, "dynamic"),
    ("text_encoder_2", "bf16, static (ours)", True, {"INFERENCE_PRECISION_HINT": "bf16"}, "static"),
    ("text_encoder_2", "f32", False, {"INFERENCE_PRECISION_HINT": "f32"}, "static"),
]  # fmt: skip


def _inputs(model, component: str, size: int, batch: int, seed: int = 0) -> dict:
    """Inputs for one call of `component` at image size `size` (the UNet at batch `batch`)."""
    import numpy as np
    import openvino as ov

    rng = np.random.default_rng(seed)
    lat = size // 8
    out = {}
    for port in model.inputs:
        name, ps, et = port.get_any_name(), port.get_partial_shape(), port.get_element_type()
        if component.startswith("text_encoder"):
            out[name] = rng.integers(0, 49407, (1, 77)).astype(np.int64)
            continue
        if name == "timestep":
            shape = [d.get_length() if d.is_static else 1 for d in ps]
            out[name] = np.full(shape, 500, np.int64 if et == ov.Type.i64 else np.float32)
            continue
        dims = []
        for i, d in enumerate(ps):
            if d.is_static:
                dims.append(d.get_length())
            elif i == 0:
                dims.append(batch if component == "unet" else 1)
            elif name == "encoder_hidden_states" and i == 1:
                dims.append(77)
            else:
                dims.append(lat)
        out[name] = rng.standard_normal(dims).astype(np.float32)
    return out


def child(spec: dict) -> dict:
    import openvino as ov

    core = ov.Core()
    xml = Path(spec["model"]) / spec["component"] / "openvino_model.xml"
    model = core.read_model(xml)
    mode = spec["mode"]
    batch = 1 if mode == "b1x2" else 2
    inputs = _inputs(model, spec["component"], spec["size"], batch)
    t = now()
    if mode != "dynamic":
        model.reshape({k: ov.PartialShape(list(v.shape)) for k, v in inputs.items()})
    compiled = core.compile_model(model, "CPU", spec["config"])
    compile_s = now() - t
    del model
    request = compiled.create_infer_request()
    out_name = compiled.outputs[0].get_any_name()

    if mode == "copy":

        def call():
            request.infer(inputs)
            return request.get_tensor(out_name).data.copy()
    else:
        for k, v in inputs.items():
            request.set_tensor(k, ov.Tensor(v, shared_memory=True))
        calls = 2 if mode == "b1x2" else 1

        def call():
            for _ in range(calls):
                request.infer()
            return request.get_tensor(out_name).data

    call()
    times = []
    for _ in range(spec["calls"]):
        t = now()
        call()
        times.append(now() - t)
    return {
        "compile_s": compile_s,
        "calls_s": times,
        "peak_rss": peak_rss_self(),
    }


def accuracy(model_dir: Path, size: int, components: list[str]) -> dict:
    """bf16 against f32 on the same inputs: the VAE decoder's image PSNR (uint8, as saved), the text encoders'
    and the UNet's relative max error (max |bf16 - f32| / max |f32|)."""
    import numpy as np
    import openvino as ov

    from convert.quantize import psnr
    from runtime.image import to_uint8

    core = ov.Core()
    out = {}
    for component in components:
        model = core.read_model(model_dir / component / "openvino_model.xml")
        inputs = _inputs(model, component, size, 2)
        model.reshape({k: ov.PartialShape(list(v.shape)) for k, v in inputs.items()})
        res = {}
        for prec in ("f32", "bf16"):
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": prec})
            res[prec] = compiled(inputs)[0].astype(np.float32)
            del compiled
        ref, got = res["f32"], res["bf16"]
        if component == "vae_decoder":
            out[component] = {"psnr_db": psnr(to_uint8(ref), to_uint8(got))}
        else:
            out[component] = {"rel_max_err": float(np.abs(got - ref).max() / np.abs(ref).max())}
    return out


def _unet_figures(model: Path, size: int, rows: list[dict]) -> dict:
    """Each UNet row's FLOPs per call (batch 2; "two batch-1 calls" do the same work) and achieved GFLOP/s (FLOPs /
    its median seconds per call); -> the runtime's choice's figures for the record, {} without UNet rows."""
    if not any(r["component"] == "unet" for r in rows):
        return {}
    flops = counted(unet_flops_at, model / "unet" / "openvino_model.xml", size, size, 2)  # read, reshaped
    if flops is None:
        return {}
    for r in rows:
        if r["component"] == "unet":
            r |= achieved(flops, [r["s_per_call"]])
    ours = next((r for r in rows if r["component"] == "unet" and r["ours"]), None)
    return {k: ours[k] for k in achieved(flops, [1.0])} if ours else {}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        print(MARK + json.dumps(child(json.loads(argv[1]))), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.choices", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="converted OpenVINO model folder")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--matmul", type=int, default=4096, help="the day's speed: an N^3 MatMul's GFLOP/s in the record")
    p.add_argument("--only", nargs="+", help="components to measure (unet, vae_decoder, text_encoder_2)")
    p.add_argument("--results", type=Path, default=RESULTS, help="the JSON-lines file to append to")
    args = p.parse_args(argv)
    model = Path(args.model).resolve()
    if not (model / "unet" / "openvino_model.xml").is_file():
        print(f"error: {args.model}: not a converted SDXL model folder (no unet/openvino_model.xml)", file=sys.stderr)
        return 2
    if args.size <= 0 or args.size % 8 or args.rounds < 1 or args.calls < 1:
        print("error: --size must be a positive multiple of 8, --rounds and --calls at least 1", file=sys.stderr)
        return 2
    variants = [v for v in VARIANTS if not args.only or v[0] in args.only]
    if not variants:
        print(f"error: --only {' '.join(args.only)}: no such component", file=sys.stderr)
        return 2
    runs: dict[tuple, list] = {}
    for r in range(args.rounds):
        for component, name, _, config, mode in variants:
            spec = dict(model=str(model), component=component, size=args.size, config=config, mode=mode,
                        calls=args.calls)  # fmt: skip
            proc = subprocess.run([sys.executable, "-m", "benchmarks.choices", "_child", json.dumps(spec)],
                                  capture_output=True, text=True)  # fmt: skip
            line = next((x for x in proc.stdout.splitlines() if x.startswith(MARK)), None)
            if line is None:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"round {r} {component} / {name}: failed: {tail}", flush=True)
                continue
            res = json.loads(line[len(MARK) :])
            runs.setdefault((component, name), []).append(res)
            print(f"round {r} {component} / {name}: {statistics.median(res['calls_s']):.4f} s/call", flush=True)
    acc = accuracy(model, args.size, sorted({v[0] for v in variants}))
    rows = []
    for component, name, ours, config, mode in variants:
        got = runs.get((component, name))
        if not got:
            continue
        per_call = statistics.median([s for g in got for s in g["calls_s"]])
        rows.append(dict(component=component, variant=name, ours=ours, config=config, mode=mode, s_per_call=per_call,
                         peak_rss=max(g["peak_rss"] for g in got),
                         compile_s=statistics.median(g["compile_s"] for g in got)))  # fmt: skip
    base = {r["component"]: r["s_per_call"] for r in rows if r["ours"]}
    unet = _unet_figures(model, args.size, rows)
    lines = [f"model {model.name}, {args.size}x{args.size}, {args.rounds} rounds x {args.calls} calls per variant",
             "", "| model | variant | s per call (median) | vs ours | peak RSS MiB | compile s |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        ratio = r["s_per_call"] / base[r["component"]] if r["component"] in base else None
        r["vs_ours"] = ratio
        vs = "—" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| {r['component']} | {r['variant']} | {r['s_per_call']:.4f} | {vs} "
                     f"| {r['peak_rss'] / 2**20:.0f} | {r['compile_s']:.2f} |")  # fmt: skip
    lines += ["", "bf16 against f32 on the same inputs: " + ", ".join(
        f"{c} " + (f"PSNR {v['psnr_db']:.1f} dB" if "psnr_db" in v else f"relative max error {v['rel_max_err']:.2e}")
        for c, v in acc.items())]  # fmt: skip
    if unet:
        lines += ["", f"unet (ours): {figures_line(unet)}"]
    print("\n".join(lines))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        from benchmarks.machine import matmul_gflops

        rec = {"model": model.name, "size": args.size, "rounds": args.rounds, "calls": args.calls,
               "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "accuracy": acc,
               "matmul_size": args.matmul, "matmul_gflops": matmul_gflops(args.matmul), **unet}  # fmt: skip
        f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
