"""python -m runtime.generate: text-to-image from an OpenVINO SDXL model folder (no torch needed)."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from runtime import model_cache
from runtime.errors import RuntimeInputError
from runtime.flags import FLAGS, cli_message, png_flags  # noqa: F401 - the CLI's names, re-exported
from runtime.inpaint_cli import add_arguments as add_inpaint_arguments
from runtime.inpaint_cli import inpaint_kwargs
from runtime.progress import Progress
from schedulers import SCHEDULER_HELP


def _prog() -> str:
    """The name the CLI was invoked by: a console script's (sdxl-ov-generate), else `python -m runtime.generate`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m runtime.generate" if not name or name.endswith(".py") or name == "-c" else name


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """The flags that set a generation, shared with runtime.batch: all but --model, --prompt and the output's."""
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
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="same noise as torch.Generator('cpu').manual_seed(SEED); default: a random one, printed as `seed: N`",
    )
    p.add_argument(
        "--seed-mode",
        choices=["per-image", "batch"],
        default="per-image",
        help="per-image (default, A1111's): image i of --num-images uses seed SEED+i and equals the one-image run "
        "with that seed; batch: diffusers' noise for the whole batch (a PNG then records its batch size and position)",
    )
    p.add_argument("--scheduler", default=None, help="default: the folder's scheduler_config.json")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA .safetensors applied at run time (diffusers/PEFT or kohya keys), weight 1 by default; "
                   "repeat for several (blended as diffusers' set_adapters)")  # fmt: skip
    p.add_argument("--fuse-lora", action="store_true",
                   help="fuse the --lora adapters into the weights (diffusers' fuse_lora): steps cost what a LoRA "
                   "fused at conversion costs; the compile is the same one")  # fmt: skip
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--prompt-syntax", choices=["plain", "compel", "a1111"], default="plain",
                   help="plain: the text as written, cut at 77 tokens (diffusers); compel: (words)1.3, word+, "
                   ".blend(), .and(), long prompts (compel's CompelForSDXL); a1111: (words:1.3), (words), [words], "
                   "BREAK, long prompts")  # fmt: skip
    p.add_argument("--device", default="CPU")
    p.add_argument("--precision", choices=["f32", "bf16", "f16"], default=None, help="default: the device's")
    p.add_argument(
        "--cache-dir",
        default="default",
        help=f"OpenVINO model cache folder ('' to disable); default {model_cache.default_cache_dir()}, kept under "
        f"${model_cache.ENV_MAX_GB} GiB (default {model_cache.DEFAULT_MAX_BYTES / 2**30:g}) by evicting the least "
        "recently used; list or clear it with `python -m runtime.model_cache list|clear`",
    )
    g = p.add_argument_group("image-to-image and the refiner")
    g.add_argument("--image", type=Path, default=None, help="input image: SDEdit image-to-image")
    g.add_argument("--strength", type=float, default=None, help="strength in [0, 1] (default 0.3; inpaint 0.9999)")
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
    g.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="refuse a size whose estimated memory exceeds this many GiB (default: $SDXL_OPENVINO_MAX_MEMORY_GB, "
        "else the memory available; inf: no check)",
    )
    add_inpaint_arguments(p)
    c = p.add_argument_group("computing less per image (README: DeepCache and guidance cut-off)")
    c.add_argument(
        "--deepcache-interval",
        type=int,
        default=1,
        help="DeepCache: the whole UNet every N steps, its shallow branch between (default 1: off)",
    )
    c.add_argument("--deepcache-branch", type=int, default=0, help="DeepCache's cache_branch_id (default 0)")
    c.add_argument(
        "--deepcache-schedule",
        choices=["uniform", "quadratic"],
        default="uniform",
        help="the full steps: every N-th, or DeepCache's sample_from_quad_center (default uniform)",
    )
    c.add_argument("--deepcache-center", type=float, default=15.0, help="the quadratic schedule's center (15)")
    c.add_argument("--deepcache-pow", type=float, default=1.4, help="the quadratic schedule's power (1.4)")
    c.add_argument(
        "--guidance-cutoff",
        type=float,
        default=None,
        help="F in (0, 1): classifier-free guidance stops after step int(steps * F) (default: off)",
    )
    v = p.add_argument_group("the VAE and previews")
    v.add_argument(
        "--vae-decoder",
        choices=["full", "tiny"],
        default="full",
        help="the VAE: full, or tiny (the folder's TAESD, convert --tiny-vae): the tiny autoencoder both decodes the "
        "final image and encodes --image (img2img, inpainting), as diffusers with pipe.vae = AutoencoderTiny",
    )
    v.add_argument(
        "--vae-tiling",
        choices=["auto", "on", "off"],
        default="auto",
        help="decode (and img2img's encode) in overlapping tiles as diffusers' vae.enable_tiling(); auto: "
        "when the untiled decode would not fit the memory available (default)",
    )
    v.add_argument(
        "--vae-tile-size",
        type=int,
        default=None,
        metavar="PX",
        help="tile size in pixels, a multiple of 32 (default: the VAE config's sample_size, 1024 for SDXL)",
    )
    v.add_argument(
        "--preview",
        choices=["none", "approx", "tiny"],
        default="none",
        help="write a preview of the predicted image every --preview-every steps to NAME-preview-STEP.png: "
        "approx (a fixed latent -> RGB projection, 1/8 size) or tiny (the tiny decoder)",
    )
    v.add_argument("--preview-every", type=int, default=1, metavar="K", help="preview every K-th step (default 1)")


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(
        prog=_prog(),
        description="Generate images with an SDXL-family OpenVINO model folder. Defaults are diffusers'.",
        epilog="schedulers (--scheduler):\n" + SCHEDULER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="model folder written by `python -m convert`")
    p.add_argument("--prompt", required=True)
    add_generation_flags(p)
    p.add_argument(
        "--output",
        type=Path,
        default=Path("image.png"),
        help=".png (several images: NAME-0.png, NAME-1.png, ...) or .npy (default image.png); an existing file is "
        "not replaced unless --overwrite",
    )
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    p.add_argument(
        "--from-png",
        type=Path,
        default=None,
        metavar="PNG",
        help="take every parameter from a PNG this tool wrote (its sdxl-openvino chunk), to make it again: "
        "`--from-png x.png --output y.png`; flags given as well override the PNG's",
    )
    p.add_argument(
        "--batch-pos",
        type=int,
        default=None,
        help="--seed-mode batch: write only image BATCH_POS of the batch (what --from-png sets for a batch's image)",
    )
    p.add_argument("--output-type", choices=["image", "latent"], default="image", help="latent: write latents .npy")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress and no list of written files (progress shows on a terminal only; a random seed is always "
        "printed)",
    )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from-png", type=Path, default=None)
    source = pre.parse_known_args(argv)[0].from_png
    if source is not None:
        from runtime.image import read_png_parameters

        try:
            argv = png_flags(read_png_parameters(source)) + argv  # the flags given after win
        except ValueError as e:
            print(f"error: --from-png {source}: {e}", file=sys.stderr)
            sys.exit(2)
    return p.parse_args(argv)


def _outputs(path: Path, n: int) -> list[Path]:
    if path.suffix == ".npy" or n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def _previews(path: Path) -> list[Path]:
    """The preview files of an output already there (NAME-preview-STEP.png)."""
    return sorted(path.parent.glob(f"{glob.escape(path.stem)}-preview-*.png"))


def _preview_path(path: Path, index: int, total: int) -> Path:
    return path.with_name(f"{path.stem}-preview-{index + 1:0{len(str(total))}d}.png")


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
    n = 1 if args.batch_pos is not None else args.num_images
    for path in _outputs(out, n):  # every numbered name, before any work
        if path.is_dir():
            raise RuntimeInputError(f"--output {path}: is a folder")
        if os.path.lexists(path) and not args.overwrite:
            raise RuntimeInputError(f"{path} exists; pass --overwrite to replace it")
    if args.preview != "none" and _previews(out) and not args.overwrite:
        raise RuntimeInputError(f"{_previews(out)[0]} exists; pass --overwrite to replace previews")


def _run(gen, progress: Progress, previews: Path | None = None):
    """previews: the output path whose NAME-preview-STEP.png files get the previews (the batch side by side)."""
    from runtime.image import save_png

    gen.on_stage = progress.stage
    for state in gen:
        progress.step(state.index + 1, state.total)
        image = gen.preview(state) if previews is not None else None
        if image is not None:
            save_png(np.concatenate(list(image), axis=1), _preview_path(previews, state.index, state.total))
    result = gen.result()
    progress.close()
    return result


def generate(args):
    """-> (result, the base pipeline): the CLI's one library call."""
    from runtime.pipeline import SDXLPipeline

    if args.refiner is None and (args.high_noise_frac is not None or args.refiner_strength is not None):
        raise RuntimeInputError("--high-noise-frac and --refiner-strength need --refiner")
    if args.high_noise_frac is not None and args.refiner_strength is not None:
        raise RuntimeInputError("choose one of --high-noise-frac (ensemble) and --refiner-strength (SDEdit)")
    if args.image is not None and args.refiner is not None and args.mask is None and args.outpaint is None:
        raise RuntimeInputError("--image with --refiner is not supported; run img2img on either folder")
    if args.image is not None and args.mask is None and args.outpaint is None and (args.height or args.width):
        raise RuntimeInputError("--height/--width do not apply with --image (its size is used)")
    if args.fuse_lora and not args.lora:
        raise RuntimeInputError("--fuse-lora needs --lora")
    if args.batch_pos is not None and (args.seed_mode != "batch" or not 0 <= args.batch_pos < args.num_images):
        raise RuntimeInputError("--batch-pos needs --seed-mode batch and a position below --num-images")
    progress = Progress(not args.quiet and sys.stderr.isatty())
    # the library's warnings (a prompt cut at 77 tokens): one line each, as `warning: ...`
    warnings.showwarning = lambda message, *_, **__: progress.note(f"warning: {message}")
    progress.stage("load")
    try:
        return _generate(args, progress, SDXLPipeline)
    except RuntimeInputError as e:
        raise RuntimeInputError(cli_message(str(e))) from None


def _generate(args, progress: Progress, SDXLPipeline):
    pipe = SDXLPipeline(args.model, device=args.device, precision=args.precision, cache_dir=args.cache_dir,
                        low_memory=args.low_memory, refiner=args.refiner)  # fmt: skip
    if args.lora:
        from runtime.lora_api import load_cli_loras

        load_cli_loras(pipe, args.lora)
        if args.fuse_lora:
            pipe.fuse_lora()
    kwargs = dict(prompt=args.prompt, prompt_2=args.prompt_2, negative_prompt=args.negative_prompt,
                  negative_prompt_2=args.negative_prompt_2, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
                  num_images_per_prompt=args.num_images, seed=args.seed, seed_mode=args.seed_mode,
                  clip_skip=args.clip_skip, prompt_syntax=args.prompt_syntax,
                  scheduler=args.scheduler, output_type="latent" if args.output_type == "latent" else "np",
                  height=args.height, width=args.width, aesthetic_score=args.aesthetic_score,
                  negative_aesthetic_score=args.negative_aesthetic_score, high_noise_frac=args.high_noise_frac,
                  refiner_strength=args.refiner_strength, deepcache_interval=args.deepcache_interval,
                  deepcache_branch=args.deepcache_branch, deepcache_schedule=args.deepcache_schedule,
                  deepcache_center=args.deepcache_center, deepcache_pow=args.deepcache_pow,
                  guidance_cutoff=args.guidance_cutoff)  # fmt: skip
    kwargs |= dict(
        vae_decoder=args.vae_decoder,
        vae_tiling=args.vae_tiling,
        vae_tile_size=args.vae_tile_size,
        preview=args.preview,
        preview_every=args.preview_every,
    )
    if args.image is not None:
        kwargs |= dict(image=args.image, strength=args.strength) | inpaint_kwargs(args)
    elif args.mask is not None or args.outpaint is not None:
        raise RuntimeInputError("--mask and --outpaint need --image")
    gen = pipe.generate(**kwargs)
    if args.seed is None:  # so that any output (.npy, latents) can be made again
        progress.note(f"seed: {gen.params.seed}")
    result = _run(gen, progress, args.output if args.preview != "none" else None)
    if args.batch_pos is not None:  # --from-png of a batch's image: the batch made again, its one image kept
        i = args.batch_pos
        result.latents, result.image_parameters = result.latents[i : i + 1], result.image_parameters[i : i + 1]
        result.images = None if result.images is None else result.images[i : i + 1]
    return result, pipe


def main(argv=None) -> int:
    from runtime.memory import ENV_MAX_MEMORY_GB

    args = parse_args(argv)
    if args.max_memory_gb is not None:  # read by the pipeline's memory check (runtime.memory.memory_limit)
        os.environ[ENV_MAX_MEMORY_GB] = str(args.max_memory_gb)
    try:
        from runtime.image import save_npy, save_png

        _check_output(args)
        result, pipe = generate(args)
    except RuntimeInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: nothing was written (outputs go through a temporary name)
        print("\ninterrupted" if sys.stderr.isatty() else "interrupted", file=sys.stderr)  # after a progress bar
        return 130
    try:
        if args.output_type == "latent":
            save_npy(result.latents, args.output)
            written = [args.output]
        elif args.output.suffix == ".npy":
            save_npy(np.ascontiguousarray(result.images), args.output)
            written = [args.output]
        else:
            written = _outputs(args.output, len(result.images))
            for image, path, params in zip(result.images, written, result.image_parameters, strict=True):
                save_png(image, path, params)  # each image's own parameters: its seed, batch position
    except OSError as e:  # disk full, folder removed meanwhile: the temporary file is gone, nothing half-written
        print(f"error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the file being written is removed; those written before it stay whole
        print("interrupted", file=sys.stderr)
        return 130
    if not args.quiet:
        print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
