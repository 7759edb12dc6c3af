"""python -m runtime.batch: one image per line of a JSON-lines file, locally or on Ray Data, each written once.

    python -m runtime.batch --model DIR --prompts FILE --out DIR [the flags of runtime.generate] [--ray [ADDR]]

FILE: one JSON object per line, {"prompt": ...} and any per-line overrides with diffusers' names or the CLI's
(seed, size "WxH", height, width, steps / num_inference_steps, negative_prompt, guidance_scale, scheduler, ...);
a line that is a JSON string is a prompt alone. Every line is checked before any work. Each image is
OUT/LLLLLL-HASH.png (line number, hash of its resolved settings) with the PNG metadata of runtime.generate, and a
line of OUT/manifest.jsonl; a re-run skips the lines done and makes the rest (runtime.batch_output).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from runtime.batch_output import BatchFailed, Output, png_bytes
from runtime.errors import RuntimeInputError
from runtime.generate import FLAGS, add_generation_flags, cli_message
from runtime.params import GenerationParams, ModelInfo, regular_file

EPILOG = """\
seeds: a line's own "seed", else --seed (default 0 here, so that a re-run makes the same images) plus the line's
index in FILE (0 for the first line): line i of `--seed 7` is the image `runtime.generate --seed 7+i` makes.
paths in a line ("image", "mask_image") are relative to FILE's folder.
--ray: a local Ray on 127.0.0.1 (as ray.init() starts one); --ray ADDR: the cluster whose head is ADDR (HOST:PORT).
Every Ray worker needs this package and the model folder at the same path (its disk, or a shared path).
Outputs are byte-identical between a local and a Ray run in f32 (--precision f32); in bf16/f16 OpenVINO's sums
depend on the thread count, so they match when the workers have as many CPUs as the local run's threads.
"""
# GenerationParams fields a line cannot set: one image per line, written as a PNG, no previews
NOT_PER_LINE = {"latents", "output_type", "preview", "preview_every", "num_images_per_prompt", "seed_mode"}
PATH_KEYS = ("image", "mask_image")


class LineError(RuntimeInputError):
    """A bad line of --prompts: its message starts with FILE:LINE and keeps the line's own key names."""


def _line_keys() -> tuple[set[str], dict[str, str]]:
    names = set(GenerationParams.names()) - NOT_PER_LINE
    aliases = {flag[2:].replace("-", "_"): key for key, flag in FLAGS.items() if key in names}
    aliases.update({flag[2:]: key for key, flag in FLAGS.items() if key in names}, guidance="guidance_scale")
    return names, {a: k for a, k in aliases.items() if a != k}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m runtime.batch",
        description="Generate one image per line of a JSON-lines file, exactly once, locally or on Ray Data.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="model folder written by `python -m convert`")
    p.add_argument("--prompts", required=True, type=Path, metavar="FILE", help="JSON lines: a prompt and overrides")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="images and manifest.jsonl (resumed)")
    add_generation_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    r = p.add_argument_group("Ray Data (pip install 'sdxl-openvino[ray]')")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDR",
                   help="run on Ray: a new local Ray on 127.0.0.1, or the cluster at ADDR (HOST:PORT)")  # fmt: skip
    r.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="pipelines (Ray actors), each one compiled model (default: as many as fit)")  # fmt: skip
    r.add_argument("--ray-cpus-per-actor", type=float, default=None, metavar="K",
                   help="CPUs each actor holds, its OpenVINO threads (default: the smallest node's CPUs)")  # fmt: skip
    r.add_argument("--ray-timeout", type=float, default=1800.0, metavar="S",
                   help="fail when no image finishes for S seconds (a stuck plan; default 1800)")  # fmt: skip
    return p.parse_args(None if argv is None else [str(a) for a in argv])


def _size(value) -> tuple[int, int]:
    """A line's "size": "WxH", [W, H] or W (square) -> (width, height)."""
    if isinstance(value, str) and "x" in value.lower():
        w, _, h = value.lower().partition("x")
        if w.strip().isdigit() and h.strip().isdigit():
            return int(w), int(h)
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        return value[0], value[1]
    if type(value) is int:
        return value, value
    raise RuntimeInputError(f'size={value!r}: use "WxH", [W, H] or one number')


def _defaults(args) -> dict:
    """The generation flags as GenerationParams keyword arguments (what `runtime.generate` passes)."""
    names = set(GenerationParams.names()) - {"latents", "output_type", "preview", "preview_every"}
    kwargs = {}
    for key, flag in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if key in names and value is not None:
            kwargs[key] = str(Path(value).resolve()) if isinstance(value, Path) else value
    return kwargs


def _check_flags(args) -> None:
    if args.num_images != 1:
        raise RuntimeInputError("--num-images: a batch makes one image per line (repeat the line with other seeds)")
    if args.preview != "none":
        raise RuntimeInputError("--preview is not written by a batch")
    if getattr(args, "outpaint", None) is not None:
        raise RuntimeInputError("--outpaint is not supported by a batch")
    if args.fuse_lora and not args.lora:
        raise RuntimeInputError("--fuse-lora needs --lora")
    for name in ("ray_actors", "ray_cpus_per_actor", "ray_timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise RuntimeInputError(f"--{name.replace('_', '-')}={value}: must be positive")


def plan(args) -> tuple[list[dict], dict]:
    """Every line of --prompts checked -> (jobs: line, name, kwargs; the pipeline's settings). Bad input: one
    RuntimeInputError naming FILE:LINE."""
    _check_flags(args)
    info = ModelInfo.load(args.model)
    settings = dict(model_dir=str(Path(args.model).resolve()), device=args.device, precision=args.precision,
                    cache_dir=args.cache_dir, low_memory=args.low_memory, max_memory_gb=args.max_memory_gb,
                    refiner=str(args.refiner.resolve()) if args.refiner is not None else None)  # fmt: skip
    if args.refiner is not None:
        ModelInfo.load(args.refiner)
    settings["loras"] = _loras(getattr(args, "lora", None) or [])
    settings["fuse_lora"] = bool(args.fuse_lora)
    base = _defaults(args)
    base_seed = base.pop("seed", 0)  # per line: its own, else --seed + its index
    names, aliases = _line_keys()
    path = args.prompts
    regular_file(path, "the --prompts file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuntimeInputError(f"--prompts {path}: unreadable ({e})") from None
    jobs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            kwargs = _line(line, base, names, aliases, path.parent.resolve())
            kwargs.setdefault("seed", base_seed + lineno - 1)
            _check_line(kwargs, info, args.refiner is not None)
        except RuntimeInputError as e:
            raise LineError(f"{where}: {e}") from None
        same = ("model_dir", "refiner", "device", "precision", "loras")  # what else changes the image
        fused = {"fuse_lora": True} if settings["fuse_lora"] else {}  # fused weights round otherwise in bf16
        key = json.dumps({"kwargs": kwargs, **{k: settings[k] for k in same}, **fused}, sort_keys=True)
        name = f"{lineno:06d}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.png"
        jobs.append({"line": lineno, "name": name, "kwargs": kwargs})
    if not jobs:
        raise RuntimeInputError(f"--prompts {path}: no lines")
    return jobs, settings


def _loras(specs: list[str]) -> list[str]:
    """--lora FILE[:WEIGHT] for every line, its file made absolute (a Ray worker's working folder is not ours)."""
    from runtime.lora_api import parse_lora_spec

    resolved = []
    for spec in specs:
        path, weight = parse_lora_spec(spec)
        if not path.is_file():
            raise RuntimeInputError(f"--lora {spec}: no such file")
        resolved.append(f"{path.resolve()}:{weight!r}")
    return resolved


def _line(line: str, base: dict, names: set, aliases: dict, folder: Path) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise RuntimeInputError(f"not JSON ({e})") from None
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise RuntimeInputError('expected a JSON object with a "prompt" (or a JSON string)')
    kwargs, given = dict(base), set()
    for key, value in obj.items():
        if key == "size":
            kwargs["width"], kwargs["height"] = _size(value)
            given |= {"width", "height"}
            continue
        name = aliases.get(key, key)
        given.add(name)
        if name not in names:
            raise RuntimeInputError(f"unknown key {key!r} (diffusers' parameter names or the CLI's flags)")
        if name in PATH_KEYS and value is not None:
            if not isinstance(value, str):
                raise RuntimeInputError(f"{key}={value!r} must be a file path")
            value = str((folder / value).resolve())
        kwargs[name] = value
    if kwargs.get("image") is not None and kwargs.get("mask_image") is None:  # an image's size is its own
        kwargs = {k: v for k, v in kwargs.items() if k not in ("height", "width") or k in given}
    return kwargs


def _check_line(kwargs: dict, info: ModelInfo, refiner: bool) -> None:
    """What runtime.generate checks before any work, for one line."""
    from schedulers import create_scheduler

    params = GenerationParams.create(**kwargs)
    if not refiner and (params.high_noise_frac is not None or params.refiner_strength is not None):
        raise RuntimeInputError("high_noise_frac and refiner_strength need --refiner")
    if params.image is not None and refiner:
        raise RuntimeInputError("image with --refiner is not supported")
    if params.image is not None and params.mask_image is None and (params.height or params.width):
        raise RuntimeInputError("height/width do not apply with an image (its size is used)")
    for key in PATH_KEYS:
        value = getattr(params, key, None)
        if value is not None and not Path(value).is_file():
            raise RuntimeInputError(f"{key} {value}: no such file")
    try:
        create_scheduler(info.scheduler_config, info.presets(params.scheduler, None, None)["scheduler"])
    except ValueError as e:
        raise RuntimeInputError(str(e)) from None


def open_pipeline(settings: dict, threads: int | None = None):
    """The one compiled pipeline of a run (or of a Ray actor, with OpenVINO's threads = the CPUs it holds)."""
    import openvino as ov

    from runtime.pipeline import SDXLPipeline

    core = ov.Core()
    if threads and settings["device"].startswith("CPU"):
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": int(threads)})
    pipe = SDXLPipeline(settings["model_dir"], device=settings["device"], precision=settings["precision"],
                        cache_dir=settings["cache_dir"], core=core, low_memory=settings["low_memory"],
                        refiner=settings["refiner"], max_memory_gb=settings["max_memory_gb"])  # fmt: skip
    if settings.get("loras"):  # as runtime.generate: every --lora active with its weight, for every line
        from runtime.lora_api import load_cli_loras

        load_cli_loras(pipe, settings["loras"])
        if settings.get("fuse_lora"):
            pipe.fuse_lora()
    return pipe


def render(pipe, job: dict) -> dict:
    """One line -> {line, name, png (bytes), entry (the manifest's fields)} or {line, name, error}."""
    t0 = time.perf_counter()
    try:
        result = pipe(**job["kwargs"])
    except RuntimeInputError as e:
        return {"line": job["line"], "name": job["name"], "error": str(e)}
    params = result.image_parameters[0]
    png = png_bytes(result.images[0], params)
    seconds = round(time.perf_counter() - t0, 3)
    entry = {"line": job["line"], "prompt": params.get("prompt"), "seed": params.get("seed"), "settings": params,
             "seconds": seconds, "worker": f"{socket.gethostname()}:{os.getpid()}"}  # fmt: skip
    return {"line": job["line"], "name": job["name"], "png": png, "entry": entry}


class BatchProgress:
    """One plain line per image on stderr: a bar, the count, the file, its seconds, elapsed and ETA."""

    def __init__(self, total: int, done: int, quiet: bool, stream=None):
        self.total, self.done, self.quiet, self.stream = total, done, quiet, stream or sys.stderr
        self.t0, self.made, self.failed = time.perf_counter(), 0, 0

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def finished(self, outcome: dict) -> None:
        if "error" in outcome:
            self.failed += 1
            self.say(f"error: line {outcome['line']}: {outcome['error']}")
            return
        self.done, self.made = self.done + 1, self.made + 1
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        left = self.total - self.done - self.failed
        eta = f"{elapsed / self.made * left:.0f} s" if left else "0 s"
        bar = "#" * int(20 * self.done / self.total)
        self.say(f"batch [{bar:<20s}] {self.done}/{self.total}  line {outcome['line']} -> {outcome['name']}  "
                 f"{outcome['entry']['seconds']:.1f} s  elapsed {elapsed:.0f} s, ETA {eta}")  # fmt: skip


def write(out: Output, outcome: dict, progress: BatchProgress) -> None:
    if "png" in outcome:
        out.add(outcome["name"], outcome["png"], {**outcome["entry"], "finished": round(time.time(), 3)})
    progress.finished(outcome)


def run_local(settings: dict, pending: list[dict], out: Output, progress: BatchProgress) -> None:
    pipe = open_pipeline(settings)
    for job in pending:
        write(out, render(pipe, job), progress)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    try:
        jobs, settings = plan(args)
        with Output(args.out, [job["name"] for job in jobs]) as out:
            pending = [job for job in jobs if job["name"] not in out.done]
            progress = BatchProgress(len(jobs), len(jobs) - len(pending), args.quiet)
            for note in out.notes:
                progress.say(note)
            if not args.quiet:
                progress.say(f"{len(jobs)} lines: {len(jobs) - len(pending)} done before, {len(pending)} to make")
            if pending and args.ray is None:
                run_local(settings, pending, out, progress)
            elif pending:
                from runtime.batch_ray import run_ray

                run_ray(args, settings, pending, out, progress)
    except LineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeInputError as e:
        print(f"error: {cli_message(str(e))}", file=sys.stderr)
        return 2
    except BatchFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    if progress.failed:
        print(f"error: {progress.failed} line(s) failed (shown above); a re-run makes them", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
