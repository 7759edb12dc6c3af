"""Benchmark harness: per-stage medians of our pipeline, the bound (pure model-call time), anchors side by side.

    python -m benchmarks.run --model DIR [--steps 20] [--height H] [--width W] [--precision f32|bf16]
        [--runs N] [--warmup 1] [--out benchmarks/out/run-<timestamp>] [--against genai,diffusers,optimum]
        [--diffusers-source DIR] [--optimum-python PATH]

Every run of every pipeline is a child process (its own peak RSS, no state shared between pipelines), and the
runs are interleaved (ours, anchor 1, anchor 2, ours, ...) so that the machine's noise falls on all of them.
Each child loads, compiles, primes with a 1-step call at the measured shapes, then times one full call.
Ours is measured from outside the runtime: the OVModel compile methods, the UNet infer request, the tokenizers,
the text encoders, the VAE decoder and decode() are wrapped by timing proxies on a disposable pipeline.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"
ANCHORS = ("genai", "genai-static", "optimum", "optimum-static", "diffusers")
MARK = "@@BENCH@@ "
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
             "amx_bf16", "amx_int8")  # fmt: skip
now = time.perf_counter


class UsageError(Exception):
    pass


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# -- ours: timing proxies ------------------------------------------------------------------------------------
class _TimedCall:
    """Wraps a callable object (tokenizer, OVModel, an optimum-intel part's compiled model); records (seconds,
    args) of each call."""

    def __init__(self, target, log: list):
        self._target, self._log = target, log

    def __call__(self, *args, **kwargs):
        t = now()
        out = self._target(*args, **kwargs)
        self._log.append((now() - t, args))
        return out

    def __getattr__(self, name):
        return getattr(self._target, name)


class _TimedRequest:
    """Wraps the UNet's InferRequest: times infer(), keeps copies of the inputs last set (for the bound)."""

    def __init__(self, request, probe: _Probe):
        self._request, self._probe = request, probe

    def set_tensor(self, name, tensor):
        if name == "sample" and self._probe.first_sample is None:
            self._probe.first_sample = now()
        self._probe.unet_inputs[name] = tensor.data.copy()
        return self._request.set_tensor(name, tensor)

    def infer(self, *args):
        t = now()
        out = self._request.infer(*args)
        self._probe.unet_infers.append(now() - t)
        return out

    def __getattr__(self, name):
        return getattr(self._request, name)


class _Probe:
    def __init__(self, pipe):
        self.first_sample, self.unet_inputs, self.unet_infers = None, {}, []
        self.tokenize, self.encoders, self.vae, self.decode = [], {}, [], []
        for enc in pipe.text_encoders:
            enc.tokenizer = _TimedCall(enc.tokenizer, self.tokenize)
            self.encoders[enc.encoder.name] = log = []
            enc.encoder = _TimedCall(enc.encoder, log)
        pipe.vae_decoder = _TimedCall(pipe.vae_decoder, self.vae)
        pipe.decode = _TimedCall(pipe.decode, self.decode)
        compile_ = pipe.unet.compile
        pipe.unet.compile = lambda shapes: _TimedRequest(compile_(shapes), self)


def _time_compiles(pipe) -> dict[str, float]:
    """Seconds spent in OVModel.compile on new shape sets (reshape + compile_model + request), per model."""
    spent: dict[str, float] = {}
    models = [pipe.unet, pipe.vae_decoder, *(enc.encoder for enc in pipe.text_encoders)]
    for m in models:

        def timed(shapes, m=m, original=m.compile):
            key = tuple(sorted((k, tuple(v)) for k, v in shapes.items()))
            fresh = key not in m._requests
            t = now()
            request = original(shapes)
            if fresh:
                spent[m.name] = spent.get(m.name, 0.0) + now() - t
            return request

        m.compile = timed
    return spent


def _infer_seconds(request, inputs: dict, calls: int = 1) -> float:
    """Set the inputs once (copies owned by the tensors), one untimed call to settle, then `calls` timed calls."""
    import openvino as ov

    for name, arr in inputs.items():
        request.set_tensor(name, ov.Tensor(arr))
    request.infer()
    total = 0.0
    for _ in range(calls):
        t = now()
        request.infer()
        total += now() - t
    return total


def worker_ours(spec: dict) -> dict:
    from runtime.pipeline import SDXLPipeline

    kwargs = dict(prompt=PROMPT, height=spec["height"], width=spec["width"], num_inference_steps=spec["steps"],
                  guidance_scale=spec["guidance_scale"], seed=0, output_type="np")  # fmt: skip
    prime = {**kwargs, "num_inference_steps": 1}
    model, device, precision = spec["model"], spec["device"], spec["precision"]
    st: dict[str, float | None] = {}
    t = now()
    pipe = SDXLPipeline(model, device, precision, cache_dir="")
    st["load"] = now() - t
    spent = _time_compiles(pipe)
    pipe(**prime)  # compiles every shape of this call, no model cache
    st["compile_cold"] = sum(spent.values())
    detail = {"compile_cold_per_model": dict(spent)}

    probe = _Probe(pipe)
    marks = []
    t0 = now()
    gen = pipe.generate(**kwargs)
    for _ in gen:
        marks.append(now())
    gen.result()
    st["end_to_end"] = now() - t0
    st["tokenize"] = sum(s for s, _ in probe.tokenize)
    for name, log in probe.encoders.items():
        st[name] = sum(s for s, _ in log)
    steps = [marks[0] - probe.first_sample] + [b - a for a, b in zip(marks, marks[1:], strict=False)]
    st["unet_step_first"] = steps[0]
    st["unet_step_steady"] = _median(steps[1:])
    st["unet_loop"] = marks[-1] - probe.first_sample
    st["vae_decode"] = sum(s for s, _ in probe.decode)
    known = ("tokenize", *probe.encoders, "unet_loop", "vae_decode")
    st["other"] = st["end_to_end"] - sum(st[k] for k in known)
    detail["unet_steps"] = steps

    # The bound: the same compiled models, same static shapes and inputs, called directly.
    bound_enc = 0.0
    for enc in pipe.text_encoders:
        model_ = enc.encoder._target
        for _, (inputs,) in probe.encoders[model_.name]:
            arrays = model_.prepare(inputs)
            bound_enc += _infer_seconds(model_.compile({k: v.shape for k, v in arrays.items()}), arrays)
    unet = pipe.unet
    del unet.compile  # the instance wrappers: back to the class method
    unet_inputs = dict(probe.unet_inputs)
    request = unet.compile({k: v.shape for k, v in unet_inputs.items()})
    bound_unet = _infer_seconds(request, unet_inputs, calls=len(steps))
    vae = pipe.vae_decoder._target
    bound_vae = 0.0
    for _, (inputs,) in probe.vae:
        arrays = vae.prepare(inputs)
        bound_vae += _infer_seconds(vae.compile({k: v.shape for k, v in arrays.items()}), arrays)
    st.update(bound_text_encoders=bound_enc, bound_unet=bound_unet, bound_vae_decode=bound_vae,
              bound=bound_enc + bound_unet + bound_vae)  # fmt: skip
    rss = peak_rss_bytes()
    del pipe, gen, probe, request, unet, vae
    gc.collect()

    # Compile with the model cache: a fresh pipeline fills an empty cache dir, another one reads it.
    with tempfile.TemporaryDirectory(prefix="bench-ov-cache-") as cache:
        for label in ("compile_cache_fill", "compile_warm"):
            pipe = SDXLPipeline(model, device, precision, cache_dir=cache)
            spent = _time_compiles(pipe)
            pipe(**prime)
            st[label] = sum(spent.values())
            del pipe
            gc.collect()
    return {"stages": st, "peak_rss_bytes": rss, "detail": detail}


def _median(values):
    from benchmarks.report import median

    return median(values)


# -- anchors -------------------------------------------------------------------------------------------------
def _ov_config(spec: dict) -> dict:
    return {"INFERENCE_PRECISION_HINT": spec["precision"]} if spec.get("precision") else {}


def _prime_and_time(call, steps: int, stages: dict, model_calls=None) -> dict:
    """An anchor's end to end: one untimed 1-step call at the measured size, then the timed call.
    model_calls: where the anchor can tell, seconds spent in its model calls during the timed call (a function
    called before it, to reset, and after it)."""
    call(1)
    if model_calls:
        model_calls()
    t = now()
    call(steps)
    stages["end_to_end"] = now() - t
    if model_calls:
        stages["model_calls"] = model_calls()
    return {"stages": stages, "peak_rss_bytes": peak_rss_bytes()}


def worker_genai(spec: dict, static: bool) -> dict:
    import openvino_genai as og

    h, w, g = spec["height"], spec["width"], spec["guidance_scale"]
    st = {}
    t = now()
    if static:
        pipe = og.Text2ImagePipeline(spec["model"])
        st["load"] = now() - t
        t = now()
        pipe.reshape(1, h, w, g)
        pipe.compile(spec["device"], **_ov_config(spec))
        st["compile"] = now() - t
    else:  # compiles in the constructor, shapes dynamic
        pipe = og.Text2ImagePipeline(spec["model"], spec["device"], **_ov_config(spec))
        st["load"] = now() - t

    def call(steps):
        return pipe.generate(PROMPT, width=w, height=h, num_inference_steps=steps, guidance_scale=g, rng_seed=0)

    def model_calls():  # genai's own per-call timers (UNet in microseconds, encoders and VAE in milliseconds)
        m = pipe.get_performance_metrics()
        return (sum(m.raw_metrics.unet_inference_durations) / 1e6 + sum(m.get_text_encoder_infer_duration().values())
                / 1e3 + m.get_vae_decoder_infer_duration() / 1e3)  # fmt: skip

    return _prime_and_time(call, spec["steps"], st, model_calls)


def worker_diffusers(spec: dict) -> dict:
    import torch
    from diffusers import DiffusionPipeline

    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    st = {}
    t = now()
    pipe = DiffusionPipeline.from_pretrained(spec["diffusers_source"], torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    st["load"] = now() - t

    def call(steps):
        return pipe(PROMPT, height=spec["height"], width=spec["width"], num_inference_steps=steps,
                    guidance_scale=spec["guidance_scale"], generator=torch.Generator("cpu").manual_seed(0),
                    output_type="np")  # fmt: skip

    return _prime_and_time(call, spec["steps"], st)


def worker_optimum(spec: dict, static: bool) -> dict:
    from optimum.intel import OVStableDiffusionXLPipeline

    h, w = spec["height"], spec["width"]
    st = {}
    t = now()
    pipe = OVStableDiffusionXLPipeline.from_pretrained(spec["model"], device=spec["device"], compile=not static,
                                                       ov_config=_ov_config(spec))  # fmt: skip
    st["load"] = now() - t  # dynamic: includes the compile, as genai's constructor does
    if static:
        t = now()
        pipe.reshape(batch_size=1, height=h, width=w, num_images_per_prompt=1)
        pipe.compile()
        st["compile"] = now() - t
    logs: dict[str, list] = {}
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        part = getattr(pipe, name, None)
        if part is not None and getattr(part, "request", None) is not None:  # optimum calls it directly
            part.request = _TimedCall(part.request, logs.setdefault(name, []))

    def call(steps):
        return pipe(PROMPT, height=h, width=w, num_inference_steps=steps, guidance_scale=spec["guidance_scale"],
                    output_type="np")  # fmt: skip

    def model_calls():  # None unless the UNet's calls were among those timed
        spent = sum(t for log in logs.values() for t, _ in log) if logs.get("unet") else None
        for log in logs.values():
            log.clear()
        return spent

    return _prime_and_time(call, spec["steps"], st, model_calls)


WORKERS = {
    "ours": worker_ours,
    "genai": lambda s: worker_genai(s, static=False),
    "genai-static": lambda s: worker_genai(s, static=True),
    "diffusers": worker_diffusers,
    "optimum": lambda s: worker_optimum(s, static=False),
    "optimum-static": lambda s: worker_optimum(s, static=True),
}


def availability(arm: str, args) -> str | None:
    """None when the anchor can run, else why it is skipped."""
    if arm.startswith("genai"):
        return None if importlib.util.find_spec("openvino_genai") else "openvino_genai not installed"
    if arm == "diffusers":
        if not (importlib.util.find_spec("diffusers") and importlib.util.find_spec("torch")):
            return "diffusers/torch not installed"
        if not args.diffusers_source:
            return "no --diffusers-source DIR given"
        if not (Path(args.diffusers_source) / "model_index.json").is_file():
            return f"{args.diffusers_source}: not a diffusers folder"
        return None
    if arm.startswith("optimum"):
        if not args.optimum_python:
            return "no --optimum-python PATH given"
        probe = subprocess.run([args.optimum_python, "-c", "import optimum.intel"], capture_output=True)
        return None if probe.returncode == 0 else f"optimum.intel not importable by {args.optimum_python}"
    return f"unknown anchor {arm!r}"


def run_child(arm: str, spec: dict, python: str) -> dict:
    cmd = [python, "-m", "benchmarks.run", "--worker", arm, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


# -- orchestration -------------------------------------------------------------------------------------------
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


def _default_size(model: Path) -> int:
    unet = json.loads((model / "unet" / "config.json").read_text())
    vae = json.loads((model / "vae_decoder" / "config.json").read_text())
    return int(unet.get("sample_size", 128)) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="converted OpenVINO model folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--precision", choices=["f32", "bf16"])
    p.add_argument("--device", default="CPU")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
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


def validate(args) -> list[str]:
    if not args.model:
        raise UsageError("--model DIR is required")
    model = Path(args.model)
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
            if arm not in ANCHORS:
                raise UsageError(f"--against {a!r}: choose from {', '.join(ANCHORS)}, none")
            if arm not in arms:
                arms.append(arm)
    return arms


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:  # a child: measure one pipeline once, print one marked JSON line
        sys.path.insert(0, str(ROOT))
        try:
            result = WORKERS[args.worker](json.loads(args.spec))
        except Exception as e:  # reported by the parent, in the table
            result = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        print(MARK + json.dumps(result), flush=True)
        return 0
    try:
        anchors = validate(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import openvino as ov

    from benchmarks import report

    model = Path(args.model).resolve()
    size = _default_size(model)
    spec = dict(model=str(model), device=args.device, precision=args.precision, steps=args.steps,
                height=args.height or size, width=args.width or size, guidance_scale=args.guidance_scale,
                diffusers_source=args.diffusers_source)  # fmt: skip
    out = Path(args.out or ROOT / "benchmarks" / "out" / f"run-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)

    status = {arm: availability(arm, args) for arm in anchors}
    arms = ["ours"] + [a for a in anchors if status[a] is None]
    for arm, why in status.items():
        if why:
            print(f"{arm}: skipped: {why}")
    records = []
    with open(out / "records.jsonl", "w") as log:

        def emit(rec):
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()

        for arm, why in status.items():
            if why:
                emit({"kind": "anchor", "arm": arm, "status": f"skipped: {why}"})
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
                        return 1
                    failed[arm] = res["error"]
                    emit({"kind": "anchor", "arm": arm, "status": f"failed: {res['error']}"})
                    continue
                for stage, seconds in res["stages"].items():
                    emit({"kind": "measurement", "arm": arm, "run": run, "warmup": warm, "stage": stage,
                          "seconds": seconds})  # fmt: skip
                emit({"kind": "measurement", "arm": arm, "run": run, "warmup": warm, "stage": "peak_rss",
                      "bytes": res["peak_rss_bytes"]})  # fmt: skip
                if "detail" in res:
                    emit({"kind": "detail", "arm": arm, "run": run, "warmup": warm, **res["detail"]})
                print(f"run {run}{' (warm-up)' if warm else ''} {arm}: end to end {res['stages']['end_to_end']:.4f} s")

        def medians(arm):
            by: dict[str, list] = {}
            for r in records:
                if r["kind"] == "measurement" and r["arm"] == arm and not r["warmup"]:
                    by.setdefault(r["stage"], []).append(r.get("seconds", r.get("bytes")))
            return {k: report.median(v) for k, v in by.items()}

        def e2e_by_run(arm):
            return {r["run"]: r["seconds"] for r in records if r["kind"] == "measurement" and r["arm"] == arm
                    and not r["warmup"] and r["stage"] == "end_to_end"}  # fmt: skip

        ours = medians("ours")
        rss = ours.pop("peak_rss")
        rows = [{"arm": "ours", "compile": ours["compile_cold"], "load": ours["load"],
                 "end_to_end": ours["end_to_end"], "model_calls": ours["bound"], "peak_rss_bytes": rss,
                 "best_end_to_end": min(e2e_by_run("ours").values())}]  # fmt: skip
        anchor_summary = {}
        for arm in anchors:
            if status[arm]:
                rows.append({"arm": arm, "status": f"skipped: {status[arm]}"})
            elif arm in failed:
                rows.append({"arm": arm, "status": f"failed: {failed[arm]}"})
            else:
                m = medians(arm)
                mine, theirs = e2e_by_run("ours"), e2e_by_run(arm)
                # ours / theirs within each run (the two ran back to back): less exposed to the machine's drift
                paired = report.median([mine[r] / theirs[r] for r in theirs if r in mine])
                rows.append({"arm": arm, **m, "peak_rss_bytes": m.pop("peak_rss"), "paired_ours_to_it": paired,
                             "best_end_to_end": min(theirs.values())})  # fmt: skip
            anchor_summary[arm] = {k: v for k, v in rows[-1].items() if k != "arm"}
            if rows[-1].get("end_to_end"):
                anchor_summary[arm]["ratio_to_ours"] = rows[-1]["end_to_end"] / ours["end_to_end"]
        overhead = ours["end_to_end"] / ours["bound"]
        summary = {
            "kind": "summary", "openvino": ov.get_version(), "python": platform.python_version(),
            "device": args.device, "precision": args.precision or "default", **cpu_info(),
            "model": str(model), "model_bytes": sum(f.stat().st_size for f in model.rglob("*.bin")),
            "height": spec["height"], "width": spec["width"], "steps": args.steps,
            "guidance_scale": args.guidance_scale, "runs": args.runs, "warmup": args.warmup,
            "medians": ours, "peak_rss_bytes": rss, "bound": ours["bound"], "overhead_ratio": overhead,
            "images_per_s": 1 / ours["end_to_end"], "anchors": anchor_summary,
            "targets": report.target_rows(ours, rss, anchor_summary),
        }  # fmt: skip
        emit(summary)

    head = (f"model {model.name}, {spec['height']}x{spec['width']}, {args.steps} steps, precision "
            f"{summary['precision']}, {args.device}, OpenVINO {summary['openvino']}, {args.runs} run(s) after "
            f"{args.warmup} warm-up, CPU flags: {' '.join(summary['cpu_flags']) or 'none'}")  # fmt: skip
    bound_line = (f"bound (pure model calls) {ours['bound']:.4f} s, end to end {ours['end_to_end']:.4f} s, "
                  f"overhead ratio {overhead:.3f}; {summary['images_per_s']:.3f} images/s, "
                  f"peak RSS {rss / 2**20:.0f} MiB")  # fmt: skip
    text = "\n\n".join([head, report.stage_table(ours), bound_line, report.anchor_table(rows),
                         report.target_table(summary["targets"])]) + "\n"  # fmt: skip
    (out / "table.md").write_text(text)
    group = {k: "setup" for k in report.OUTSIDE} | {k: "bound" for k in report.BOUND}
    bars = [(k, ours[k], group.get(k, "ours")) for k in report.stage_order(ours)]
    bars += [(f"{r['arm']}: end_to_end", r.get("end_to_end"), "anchor") for r in rows[1:]]
    report.draw_chart(out / "stages.png", bars, f"per-stage medians (s): {model.name}, {args.steps} steps")
    print(text, end="")
    print(f"written: {out / 'records.jsonl'}, {out / 'table.md'}, {out / 'stages.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
