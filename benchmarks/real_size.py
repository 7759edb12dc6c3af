"""Seconds per image at real size (random weights): one generation per model, projected to a full step count.

Each model runs in its own child process: load, a 1-step priming call at the measured size (compiles every
model for its shapes; the model cache makes later starts cheap), then one timed call of --steps steps, split
into text encoding, each UNet step and VAE decode by iterating the generation. The projection to N steps is
end to end + (N - steps) x the median steady step. Peak RSS is the child's.

    python -m benchmarks.real_size --models sdxl-base-1.0 ssd-1b segmind-vega lcm-ssd-1b [--steps 2] [--size 1024]
    python -m benchmarks.real_size --models sdxl-base-1.0 --refiner sdxl-refiner-1.0 --steps 4 --high-noise-frac 0.5 \
        --project-high-noise-frac 0.8
    python -m benchmarks.real_size --models sdxl-base-1.0 --size 512 --steps 6 --repeat 2 \
        --variants plain deepcache_interval=3 guidance_cutoff=0.4 "deepcache_interval=3 guidance_cutoff=0.4"

The strategy flags (--deepcache-*, --guidance-cutoff) apply to every run; --variants runs each model once per
variant (parameter overrides, "plain" for none), interleaved --repeat times. A run with DeepCache or a guidance
cut-off is not projected (its steps differ in cost): compare variants at the measured step count, by the UNet's
seconds (the sum of its calls' inference times) and end to end. Each invocation measures a 4096^3 MatMul's
GFLOP/s (numpy f32, OpenVINO bf16 and f32) first and records it with every result, next to the UNet's FLOPs per
call (benchmarks.flops, counted from the IR at the first call's shapes) and its achieved GFLOP/s (those FLOPs / the
median seconds of the full calls at those shapes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.flops import achieved, counted, figures_line, unet_flops
from benchmarks.memory import peak_rss_self
from benchmarks.strategy import STRATEGY, add_flags, chosen

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "results" / "real_size.jsonl"
PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"
now = time.perf_counter


def _folder(name: str, weights: str) -> Path:
    return OUT / f"{name}-random-ov-{weights}"


def _timed(pipe, **kw) -> dict:
    """One generation: seconds to the first step (text encoding + setup), each step, and the decode; the UNet's
    calls (inference seconds each, how many ran DeepCache's shallow branch, the input shapes of each full call)."""
    full: dict[int, dict] = {}  # call index -> input shapes, for each full UNet call (the observers see those only)

    def observe(inputs):
        full[len(gen.denoiser.call_seconds)] = {k: list(v.shape) for k, v in inputs.items()}

    pipe.unet_observers.append(observe)
    t0 = now()
    gen = pipe.generate(**kw)
    marks = [t0]
    try:
        for _ in gen:
            marks.append(now())
    finally:
        pipe.unet_observers.remove(observe)
    t_loop = now()
    result = gen.result()
    end = now()
    steps = [b - a for a, b in zip(marks[1:], marks[2:], strict=False)]
    out = {"first_step_s": marks[1] - t0, "steps_s": steps, "decode_s": end - t_loop, "end_to_end_s": end - t0,
           "result": result}  # fmt: skip
    denoiser = getattr(gen, "denoiser", None)
    if denoiser is not None:
        out |= {"unet_calls_s": list(denoiser.call_seconds), "unet_s": sum(denoiser.call_seconds),
                "shallow_calls": getattr(denoiser, "shallow_calls", 0)}  # fmt: skip
        shapes = list({json.dumps(v): v for v in full.values()}.values())  # distinct, in order of first use
        # per call: the index of its input shapes in unet_shapes (full calls), None for a shallow call
        kinds = [shapes.index(full[i]) if i in full else None for i in range(len(denoiser.call_seconds))]
        out |= {"unet_shapes": shapes, "unet_call_shape": kinds}
    return out


def child(spec: dict) -> dict:
    from runtime.pipeline import SDXLPipeline

    size, steps = spec["size"], spec["steps"]
    t = now()
    pipe = SDXLPipeline(_folder(spec["model"], spec["weights"]), low_memory=spec["low_memory"])
    kw = dict(prompt=PROMPT, height=size, width=size, seed=0, output_type="np")
    kw |= {k: spec[k] for k in STRATEGY if spec.get(k) is not None}
    kw |= pipe.info.presets(None, steps, None)  # the folder's scheduler and guidance (LCM: its recipe)
    refiner = None
    if spec.get("refiner"):
        refiner = SDXLPipeline(_folder(spec["refiner"], spec["weights"]), share_with=pipe,
                               low_memory=spec["low_memory"])  # fmt: skip
    load = now() - t
    t = now()
    # compiles (from the model cache when it has them); 2 steps: the guidance cut-off's batch-B UNet too
    pipe(**{**kw, "num_inference_steps": 2 if kw.get("guidance_cutoff") else 1})
    prime = now() - t
    out = {"load_s": load, "prime_s": prime}
    if refiner is None:
        out |= {k: v for k, v in _timed(pipe, **kw).items() if k != "result"}
    else:
        frac = spec["high_noise_frac"]
        base = _timed(pipe, **{**kw, "denoising_end": frac, "output_type": "latent"})
        if spec["low_memory"]:
            pipe.release()
        ref_kw = dict(prompt=PROMPT, image=base["result"].latents, seed=0, num_inference_steps=steps,
                      denoising_start=frac, output_type="np")  # fmt: skip
        refiner(**ref_kw)  # prime: compiles the refiner's UNet
        ref = _timed(refiner, **ref_kw)
        out |= {"parts": {"base": {k: v for k, v in base.items() if k != "result"},
                          "refiner": {k: v for k, v in ref.items() if k != "result"}},
                "end_to_end_s": base["end_to_end_s"] + ref["end_to_end_s"]}  # fmt: skip
    out["peak_rss"] = peak_rss_self()
    return out


def _commit() -> str | None:
    """The checkout's commit (the code the figures belong to), or None outside a git checkout."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _step(part: dict) -> float:
    return statistics.median(part["steps_s"]) if part["steps_s"] else part["first_step_s"]


def project(rec: dict, target: int, steps: int) -> float:
    """Seconds per image at `target` steps from a run of `steps` steps (base + refiner: split at the hand-off,
    `project_high_noise_frac` of the steps in the base)."""
    if "parts" in rec:
        n_base = round(target * rec.get("project_high_noise_frac", rec["high_noise_frac"]))
        counts = {"base": n_base, "refiner": target - n_base}
        parts = rec["parts"]
        return sum(parts[p]["end_to_end_s"] + (n - len(parts[p]["steps_s"]) - 1) * _step(parts[p])
                   for p, n in counts.items())  # fmt: skip
    return rec["end_to_end_s"] + (target - steps) * _step(rec)


def _part_figures(part: dict, xml: Path, cache: dict) -> dict:
    """A generation's UNet FLOPs per call at its first call's shapes (a full call at the guided batch) and the
    achieved GFLOP/s over the calls at those shapes: FLOPs / their median seconds (DeepCache's shallow calls and
    the guidance cut-off's batch-B calls do other work and are left out)."""
    if not part.get("unet_shapes"):
        return {}
    key = (str(xml), json.dumps(part["unet_shapes"][0]))
    if key not in cache:  # the IR read (weights memory-mapped) and reshaped, not compiled
        cache[key] = counted(unet_flops, xml, part["unet_shapes"][0])
    if cache[key] is None:
        return {}
    seconds = [s for s, k in zip(part["unet_calls_s"], part["unet_call_shape"], strict=True) if k == 0]
    return achieved(cache[key], seconds) | {"unet_achieved_calls": len(seconds)}


def unet_figures(rec: dict, model: str, refiner: str | None, weights: str, cache: dict) -> dict:
    """The record's UNet FLOPs per call and achieved GFLOP/s (base + refiner: each part's in its part, the
    base's at the top)."""
    if "parts" not in rec:
        return _part_figures(rec, _folder(model, weights) / "unet" / "openvino_model.xml", cache)
    for name, m in (("base", model), ("refiner", refiner)):
        rec["parts"][name] |= _part_figures(rec["parts"][name], _folder(m, weights) / "unet" / "openvino_model.xml",
                                            cache)  # fmt: skip
    figures = ("unet_gflop_per_call", "unet_flops_method", "unet_achieved_gflops", "unet_achieved_calls")
    return {k: rec["parts"]["base"][k] for k in figures if k in rec["parts"]["base"]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        print("@@REAL@@ " + json.dumps(child(json.loads(argv[1]))), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_size", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["sdxl-base-1.0", "ssd-1b", "segmind-vega", "lcm-ssd-1b"])
    p.add_argument("--refiner", help="with one base model: the refiner folder's model name")
    p.add_argument("--high-noise-frac", type=float, default=0.8, help="the base/refiner split of the measured run")
    p.add_argument("--project-high-noise-frac", type=float,
                   help="the split of the projected run (default: --high-noise-frac); measure at 0.5 to time steps "
                        "of both UNets with few steps, project at 0.8")  # fmt: skip
    p.add_argument("--weights", default="fp16", help="folder suffix: benchmarks/out/<model>-random-ov-<weights>")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--project", type=int, default=30, help="steps to project to (LCM folders: their preset, as is)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--low-memory", action="store_true")
    add_flags(p)
    p.add_argument("--variants", nargs="+", default=["plain"],
                   help='runs per model, each "plain" or space-separated key=value overrides of the strategy flags '
                        'and of weights (the folder suffix), e.g. "deepcache_interval=3 guidance_cutoff=0.4" or '
                        '"weights=int8 deepcache_interval=3"')  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="run the variants (interleaved) this many times")
    p.add_argument("--no-matmul", action="store_true", help="skip the 4096^3 MatMul GFLOP/s measurement")
    args = p.parse_args(argv)
    variants = []  # (weights, strategy overrides)
    for v in args.variants:
        over, weights = {}, args.weights
        for item in [] if v == "plain" else v.split():
            key, _, value = item.partition("=")
            if key not in (*STRATEGY, "weights") or not value:
                p.error(f"--variants {v!r}: {item!r} is not key=value with a key of {', '.join(STRATEGY)}, weights")
            if key == "weights":
                weights = value
            else:
                over[key] = value if key == "deepcache_schedule" else float(value) if "." in value else int(value)
        variants.append((weights, over))
    matmul = None
    if not args.no_matmul:
        code = "import json; from benchmarks.machine import matmul_gflops; print(json.dumps(matmul_gflops()))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # fmt: skip
        if proc.returncode == 0:
            matmul = json.loads(proc.stdout.strip().splitlines()[-1])
            print("matmul 4096^3 GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in matmul.items()), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from runtime.errors import RuntimeInputError
    from runtime.params import ModelInfo

    runs = [(model, *v) for _ in range(args.repeat) for model in args.models for v in variants]
    flops_cache: dict = {}  # (IR, input shapes) -> its FLOPs per call, counted once
    for model, weights, over in runs:
        try:
            info = ModelInfo.load(_folder(model, weights))
        except RuntimeInputError as e:
            print(f"{model}: failed: {e}")
            continue
        strategy = chosen(args) | over
        lcm = info.is_lcm  # an LCM folder runs its preset steps (4), as is: no projection
        steps = info.presets(None, None, None)["num_inference_steps"] if lcm else args.steps
        spec = dict(model=model, weights=weights, size=args.size, steps=steps, low_memory=args.low_memory,
                    refiner=args.refiner, high_noise_frac=args.high_noise_frac, **strategy)  # fmt: skip
        t = now()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.real_size", "_child", json.dumps(spec)],
                              capture_output=True, text=True)  # fmt: skip
        wall = now() - t
        line = next((x for x in proc.stdout.splitlines() if x.startswith("@@REAL@@ ")), None)
        if proc.returncode or line is None:
            print(f"{model}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        rec = {**spec, **json.loads(line[9:]), "wall_s": wall, "date": time.strftime("%Y-%m-%d %H:%M"),
               "commit": _commit(), "matmul_gflops": matmul}  # fmt: skip
        rec |= unet_figures(rec, model, args.refiner, weights, flops_cache)
        strategic = strategy.get("deepcache_interval", 1) > 1 or strategy.get("guidance_cutoff") is not None
        target = steps if lcm or strategic else args.project
        rec["projected_steps"] = target
        if args.refiner:
            rec["project_high_noise_frac"] = args.project_high_noise_frac or args.high_noise_frac
        rec["projected_s_per_image"] = rec["end_to_end_s"] if lcm or strategic else project(rec, target, steps)
        with RESULTS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        name = model + (f" ({weights})" if weights != args.weights else "")
        name += f" + {args.refiner}" if args.refiner else ""
        name += "".join(f" {k}={v}" for k, v in strategy.items()) or " plain"
        if "unet_s" in rec:
            name += f": UNet {rec['unet_s']:.2f} s ({len(rec['unet_calls_s'])} calls, {rec['shallow_calls']} shallow)"
        print(
            f"{name}: {steps} steps {rec['end_to_end_s']:.1f} s end to end -> {rec['projected_s_per_image']:.1f} s "
            f"per image at {target} steps; load {rec['load_s']:.1f} s, first call (compile) {rec['prime_s']:.1f} s, "
            f"peak RSS {rec['peak_rss'] / 2**30:.2f} GiB{' (low memory)' if args.low_memory else ''}",
            flush=True,
        )
        if "unet_achieved_gflops" in rec:
            bf16 = f"; MatMul {matmul['openvino_bf16']:.0f} bf16 GFLOP/s" if matmul else ""
            print(f"  {figures_line(rec)} over {rec['unet_achieved_calls']} full calls{bf16}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
