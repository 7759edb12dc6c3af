"""python -m runtime.generate: text-to-image from an OpenVINO SDXL model folder (no torch needed)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from runtime import model_cache
from runtime.errors import RuntimeInputError
from schedulers import SCHEDULER_HELP


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m runtime.generate",
        description="Generate images with an SDXL-family OpenVINO model folder. Defaults are diffusers'.",
        epilog="schedulers (--scheduler):\n" + SCHEDULER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="model folder written by `python -m convert`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--prompt-2", default=None, help="prompt for text_encoder_2 (default: --prompt)")
    p.add_argument("--negative-prompt-2", default=None)
    p.add_argument("--height", type=int, default=None, help="default: the UNet's sample size x 8")
    p.add_argument("--width", type=int, default=None)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="num_inference_steps (default 50; 4 for an LCM model or --scheduler lcm)",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="default 5.0; LCM: 8.0 with a w-embedding UNet (time_cond_proj_dim), else 1.0",
    )
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="same noise as torch.Generator('cpu').manual_seed(SEED)")
    p.add_argument("--scheduler", default=None, help="default: the folder's scheduler_config.json")
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--device", default="CPU")
    p.add_argument("--precision", choices=["f32", "bf16", "f16"], default=None, help="default: the device's")
    p.add_argument(
        "--cache-dir",
        default="default",
        help=f"OpenVINO model cache folder ('' to disable); default {model_cache.default_cache_dir()}, kept under "
        f"${model_cache.ENV_MAX_GB} GiB (default {model_cache.DEFAULT_MAX_BYTES / 2**30:g}) by evicting the least "
        "recently used; list or clear it with `python -m runtime.model_cache list|clear`",
    )
    p.add_argument("--output", type=Path, default=Path("image.png"), help=".png (one file per image) or .npy")
    p.add_argument("--output-type", choices=["image", "latent"], default="image", help="latent: write latents .npy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("image-to-image and the refiner")
    g.add_argument("--image", type=Path, default=None, help="input image: SDEdit image-to-image")
    g.add_argument("--strength", type=float, default=0.3, help="img2img strength in [0, 1] (default 0.3)")
    g.add_argument("--refiner", type=Path, default=None, help="a refiner model folder run after the base")
    g.add_argument(
        "--high-noise-frac",
        type=float,
        default=None,
        help="ensemble of experts: the base denoises this fraction, the refiner the rest (e.g. 0.8)",
    )
    g.add_argument(
        "--refiner-strength",
        type=float,
        default=None,
        help="SDEdit refinement of the base's latents at this strength (default 0.3)",
    )
    g.add_argument("--aesthetic-score", type=float, default=6.0, help="refiner micro-conditioning")
    g.add_argument("--negative-aesthetic-score", type=float, default=2.5)
    g.add_argument(
        "--low-memory",
        action="store_true",
        help="compile each model when its stage starts and release it when the stage is done",
    )
    return p.parse_args(argv)


def _outputs(path: Path, n: int) -> list[Path]:
    if path.suffix == ".npy" or n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def _check_output(args) -> None:
    out = args.output
    if args.output_type == "latent" and out.suffix != ".npy":
        raise RuntimeInputError(f"--output {out}: latents are written as .npy")
    if out.suffix not in (".png", ".npy"):
        raise RuntimeInputError(f"--output {out}: use a .png or .npy file name")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise RuntimeInputError(f"--output {out}: folder {parent} does not exist")
    probe = parent / f".{out.name}.probe-{os.getpid()}"
    try:  # root passes os.access checks: try a real write, before any work
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RuntimeInputError(f"--output {out}: folder {parent} is not writable ({e.strerror or e})") from None


class Progress:
    def __init__(self, quiet: bool):
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        bar = "#" * int(30 * done / total)
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r[{bar:<30s}] {done}/{total} steps  {rate:.2f} it/s{end}")
        sys.stderr.flush()


def _run(gen, progress: Progress):
    for state in gen:
        progress(state.index + 1, state.total)
    return gen.result()


def generate(args):
    """-> (result, the base pipeline): the CLI's one library call."""
    from runtime.pipeline import SDXLPipeline

    if args.refiner is None and (args.high_noise_frac is not None or args.refiner_strength is not None):
        raise RuntimeInputError("--high-noise-frac and --refiner-strength need --refiner")
    if args.high_noise_frac is not None and args.refiner_strength is not None:
        raise RuntimeInputError("choose one of --high-noise-frac (ensemble) and --refiner-strength (SDEdit)")
    if args.image is not None and args.refiner is not None:
        raise RuntimeInputError("--image with --refiner is not supported; run img2img on either folder")
    if args.image is not None and (args.height or args.width):
        raise RuntimeInputError("--height/--width do not apply with --image (its size is used)")
    pipe = SDXLPipeline(args.model, device=args.device, precision=args.precision, cache_dir=args.cache_dir,
                        low_memory=args.low_memory, refiner=args.refiner)  # fmt: skip
    kwargs = dict(prompt=args.prompt, prompt_2=args.prompt_2, negative_prompt=args.negative_prompt,
                  negative_prompt_2=args.negative_prompt_2, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
                  num_images_per_prompt=args.num_images, seed=args.seed, clip_skip=args.clip_skip,
                  scheduler=args.scheduler, output_type="latent" if args.output_type == "latent" else "np",
                  height=args.height, width=args.width, aesthetic_score=args.aesthetic_score,
                  negative_aesthetic_score=args.negative_aesthetic_score, high_noise_frac=args.high_noise_frac,
                  refiner_strength=args.refiner_strength)  # fmt: skip
    if args.image is not None:
        kwargs |= dict(image=args.image, strength=args.strength)
    return _run(pipe.generate(**kwargs), Progress(args.quiet)), pipe


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from runtime.image import save_npy, save_png

        _check_output(args)
        result, pipe = generate(args)
    except RuntimeInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scheduler = result.parameters.get("scheduler") or pipe.info.scheduler_config.get("_class_name")
    params = dict(result.parameters, model=str(args.model), scheduler=scheduler)
    try:
        if args.output_type == "latent":
            save_npy(result.latents, args.output)
            written = [args.output]
        elif args.output.suffix == ".npy":
            save_npy(np.ascontiguousarray(result.images), args.output)
            written = [args.output]
        else:
            written = _outputs(args.output, len(result.images))
            for image, path in zip(result.images, written, strict=True):
                save_png(image, path, params)
    except OSError as e:  # disk full, folder removed meanwhile: the temporary file is gone, nothing half-written
        print(f"error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
