"""Seconds per image at real size (random weights): one generation per model, projected to a full step count.

Each model runs in its own child process: load, a 1-step priming call at the measured size (compiles every
model for its shapes; the model cache makes later starts cheap), then one timed call of --steps steps, split
into text encoding, each UNet step and VAE decode by iterating the generation. The projection to N steps is
end to end + (N - steps) x the median steady step. Peak RSS is the child's.

    python -m benchmarks.real_size --models sdxl-base-1.0 ssd-1b segmind-vega lcm-ssd-1b [--steps 2] [--size 1024]
    python -m benchmarks.real_size --models sdxl-base-1.0 --refiner sdxl-refiner-1.0 --steps 4 --high-noise-frac 0.5 \
        --project-high-noise-frac 0.8
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

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "results" / "real_size.jsonl"
PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed"
now = time.perf_counter


def _folder(name: str, weights: str) -> Path:
    return OUT / f"{name}-random-ov-{weights}"


def _timed(pipe, **kw) -> dict:
    """One generation: seconds to the first step (text encoding + setup), each step, and the decode."""
    t0 = now()
    gen = pipe.generate(**kw)
    marks = [t0]
    for _ in gen:
        marks.append(now())
    t_loop = now()
    result = gen.result()
    end = now()
    steps = [b - a for a, b in zip(marks[1:], marks[2:], strict=False)]
    return {"first_step_s": marks[1] - t0, "steps_s": steps, "decode_s": end - t_loop, "end_to_end_s": end - t0,
            "result": result}  # fmt: skip


def child(spec: dict) -> dict:
    from runtime.pipeline import SDXLPipeline

    size, steps = spec["size"], spec["steps"]
    t = now()
    pipe = SDXLPipeline(_folder(spec["model"], spec["weights"]), low_memory=spec["low_memory"])
    kw = dict(prompt=PROMPT, height=size, width=size, seed=0, output_type="np")
    kw |= pipe.info.presets(None, steps, None)  # the folder's scheduler and guidance (LCM: its recipe)
    refiner = None
    if spec.get("refiner"):
        refiner = SDXLPipeline(_folder(spec["refiner"], spec["weights"]), share_with=pipe,
                               low_memory=spec["low_memory"])  # fmt: skip
    load = now() - t
    t = now()
    pipe(**{**kw, "num_inference_steps": 1})  # compiles (from the model cache when it has them)
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
    args = p.parse_args(argv)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from runtime.errors import RuntimeInputError
    from runtime.params import ModelInfo

    for model in args.models:
        try:
            info = ModelInfo.load(_folder(model, args.weights))
        except RuntimeInputError as e:
            print(f"{model}: failed: {e}")
            continue
        lcm = info.is_lcm  # an LCM folder runs its preset steps (4), as is: no projection
        steps = info.presets(None, None, None)["num_inference_steps"] if lcm else args.steps
        spec = dict(model=model, weights=args.weights, size=args.size, steps=steps, low_memory=args.low_memory,
                    refiner=args.refiner, high_noise_frac=args.high_noise_frac)  # fmt: skip
        t = now()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.real_size", "_child", json.dumps(spec)],
                              capture_output=True, text=True)  # fmt: skip
        wall = now() - t
        line = next((x for x in proc.stdout.splitlines() if x.startswith("@@REAL@@ ")), None)
        if proc.returncode or line is None:
            print(f"{model}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        rec = {**spec, **json.loads(line[9:]), "wall_s": wall, "date": time.strftime("%Y-%m-%d %H:%M"),
               "commit": _commit()}  # fmt: skip
        target = steps if lcm else args.project
        rec["projected_steps"] = target
        if args.refiner:
            rec["project_high_noise_frac"] = args.project_high_noise_frac or args.high_noise_frac
        rec["projected_s_per_image"] = rec["end_to_end_s"] if lcm else project(rec, target, steps)
        with RESULTS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        name = model + (f" + {args.refiner}" if args.refiner else "")
        print(
            f"{name}: {steps} steps {rec['end_to_end_s']:.1f} s end to end -> {rec['projected_s_per_image']:.1f} s "
            f"per image at {target} steps; load {rec['load_s']:.1f} s, first call (compile) {rec['prime_s']:.1f} s, "
            f"peak RSS {rec['peak_rss'] / 2**30:.2f} GiB{' (low memory)' if args.low_memory else ''}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
