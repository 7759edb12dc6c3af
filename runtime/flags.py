"""The CLI's flag for each of the library's parameter names: `--from-png` turns a PNG's recorded parameters into
flags, and the CLI words the library's errors with its flags."""

from __future__ import annotations

import re

# the JSON chunk's keys (diffusers' names) -> the CLI's flags: --from-png, and the errors the CLI prints
FLAGS = {
    "model": "--model", "refiner": "--refiner", "prompt": "--prompt", "prompt_2": "--prompt-2",
    "negative_prompt": "--negative-prompt", "negative_prompt_2": "--negative-prompt-2", "height": "--height",
    "width": "--width", "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale",
    "guidance_rescale": "--guidance-rescale", "num_images_per_prompt": "--num-images", "seed": "--seed",
    "seed_mode": "--seed-mode", "clip_skip": "--clip-skip", "prompt_syntax": "--prompt-syntax",
    "scheduler": "--scheduler", "image": "--image",
    "strength": "--strength", "high_noise_frac": "--high-noise-frac", "refiner_strength": "--refiner-strength",
    "aesthetic_score": "--aesthetic-score", "negative_aesthetic_score": "--negative-aesthetic-score",
    "device": "--device", "precision": "--precision", "batch_pos": "--batch-pos",
    "vae_decoder": "--vae-decoder", "vae_tiling": "--vae-tiling", "vae_tile_size": "--vae-tile-size",
    "preview": "--preview", "preview_every": "--preview-every",
    "deepcache_interval": "--deepcache-interval", "deepcache_branch": "--deepcache-branch",
    "deepcache_schedule": "--deepcache-schedule", "deepcache_center": "--deepcache-center",
    "deepcache_pow": "--deepcache-pow", "guidance_cutoff": "--guidance-cutoff", "mask_image": "--mask",
    "padding_mask_crop": "--padding-mask-crop", "mask_blur": "--mask-blur",
}  # fmt: skip
# what the CLI cannot set: a PNG that records another value cannot be made again from the command line
_CLI_DEFAULTS = {
    "original_size": None, "target_size": None, "negative_original_size": None, "negative_target_size": None,
    "crops_coords_top_left": [0, 0], "negative_crops_coords_top_left": [0, 0], "denoising_start": None,
    "denoising_end": None,
}  # fmt: skip


def png_flags(params: dict) -> list[str]:
    """A PNG's recorded parameters (runtime.image.read_png_parameters) -> the command-line flags that make that
    image again (`--from-png`); ValueError for what the command line cannot set."""
    for key, default in _CLI_DEFAULTS.items():
        value = params.get(key, default)
        if (list(value) if isinstance(value, (list, tuple)) else value) != default:
            raise ValueError(f"it records {key}={value!r}, which the command line cannot set (use the Python API)")
    if not isinstance(params.get("prompt"), str):
        raise ValueError("it was made from a list of prompts; the command line takes one (use the Python API)")
    if params.get("image") == "<in-memory image>":
        raise ValueError("its input image was not a file; pass it with --image")
    skip = {"height", "width"} if params.get("image") is not None else {"strength"}
    skip = set() if params.get("mask_image") is not None else skip  # inpainting: the size it was resized to
    flags = []
    for key, flag in FLAGS.items():
        value = params.get(key)
        if value is not None and key not in skip and not (key == "refiner_strength" and params.get("high_noise_frac")):
            flags.append(f"{flag}={value}")  # one token each: values that start with "-" stay values
    flags += [f"--lora={a['path']}:{a['weight']}" for a in params.get("loras") or []]
    flags += ["--fuse-lora"] if any(a.get("fused") for a in params.get("loras") or []) else []
    return flags  # batch seed mode: --num-images, --seed-mode batch and --batch-pos make the batch, keep its image


_FLAG_NAMES = re.compile(r"(?<![\w-])(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")(?=[=\s,:)]|$)")


def cli_message(message: str) -> str:
    """An error of the library in the CLI's words: `num_inference_steps=0 ...` -> `--steps=0 ...`. Only names
    that carry a value (`name=`) or an underscore (never prose) are replaced."""
    return _FLAG_NAMES.sub(
        lambda m: FLAGS[m.group(1)] if "_" in m.group(1) or message[m.end() : m.end() + 1] == "=" else m.group(1),
        message,
    )
