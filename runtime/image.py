"""Images in and out: VAE output -> uint8, PNG with generation parameters, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from runtime.leftovers import cleanup_stale


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, rounded as diffusers rounds.
    # ref: diffusers VaeImageProcessor.postprocess + numpy_to_pil"""
    x = np.clip(decoded / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1)
    return (x * np.float32(255)).round().astype(np.uint8)


# our scheduler names (schedulers.SCHEDULER_NAMES) -> A1111's sampler names
A1111_SAMPLERS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "lcm": "LCM",
}
JSON_CHUNK = "sdxl-openvino"  # the PNG text chunk holding the parameters as JSON (what --from-png reads)


def sampler_name(scheduler_config: dict, scheduler: str | None = None) -> str:
    """A1111's name of the sampler a generation ran: `scheduler` (a short or diffusers class name) or, for None,
    the folder's scheduler_config.json class, told apart by the config keys our short names imply."""
    from schedulers.config import NAMES, effective_config, resolve_name

    name = scheduler or scheduler_config.get("_class_name")
    try:
        class_name, overrides = resolve_name(name)
    except ValueError:
        return str(name)
    cfg = effective_config(scheduler_config, class_name, overrides)
    for short, (cls, implied, _) in NAMES.items():
        if cls == class_name and all(cfg.get(k) == v for k, v in implied.items()):
            return A1111_SAMPLERS[short]
    return class_name


def _num(x):
    return f"{x:g}" if isinstance(x, float) else x


def a1111_parameters(p: dict) -> str:
    """The `parameters` text chunk A1111-style tools read (one image's parameters: GenerationResult's
    image_parameters)."""
    prompt = p.get("prompt", "")
    lines = [prompt if isinstance(prompt, str) else " | ".join(prompt)]
    loras = p.get("loras") or []  # A1111's convention: <lora:NAME:WEIGHT> in the prompt, "Lora hashes" below
    lines[0] += "".join(f" <lora:{a['name']}:{_num(float(a['weight']))}>" for a in loras)
    if p.get("negative_prompt"):
        neg = p["negative_prompt"]
        lines.append(f"Negative prompt: {neg if isinstance(neg, str) else ' | '.join(neg)}")
    size = f"{p['width']}x{p['height']}" if p.get("width") and p.get("height") else None
    img2img = p.get("image") is not None
    refiner = p.get("refiner")
    fields = [
        ("Steps", p.get("num_inference_steps")),
        ("Sampler", p.get("sampler") or p.get("scheduler")),
        ("CFG scale", _num(p.get("guidance_scale"))),
        ("Seed", p.get("seed")),
        ("Size", size),
        ("Model", p.get("model")),
        ("Denoising strength", _num(p.get("strength")) if img2img else None),
        ("Clip skip", p.get("clip_skip")),
        ("Prompt syntax", p["prompt_syntax"] if p.get("prompt_syntax") not in (None, "plain") else None),
        ("CFG rescale", _num(p["guidance_rescale"]) if p.get("guidance_rescale") else None),
        ("Batch size", p.get("batch_size")),
        ("Batch pos", p.get("batch_pos")),
        ("Refiner", refiner),
        ("Refiner switch at", _num(p.get("high_noise_frac")) if refiner else None),
        ("Refiner strength", _num(p.get("refiner_strength")) if refiner else None),
        ("Lora hashes", '"' + ", ".join(f"{a['name']}: {a['hash']}" for a in loras) + '"' if loras else None),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def png_text(parameters: dict) -> dict[str, str]:
    """The PNG text chunks of one image: A1111's `parameters` and the JSON chunk (what PIL's `image.info` holds)."""
    return {"parameters": a1111_parameters(parameters), JSON_CHUNK: json.dumps(parameters)}


def png_info(text: dict[str, str]) -> PngImagePlugin.PngInfo:
    """PIL's save() does not write `image.info`: `img.save(path, pnginfo=png_info(img.info))` keeps the chunks."""
    info = PngImagePlugin.PngInfo()
    for k in ("parameters", JSON_CHUNK):
        if k in text:
            info.add_text(k, text[k])
    return info


def read_png_parameters(path: str | Path) -> dict:
    """The parameters a PNG of ours records (its JSON chunk); ValueError when it has none."""
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if JSON_CHUNK not in text:
        raise ValueError(f"{path}: no {JSON_CHUNK!r} text chunk (not written by sdxl-openvino)")
    try:
        params = json.loads(text[JSON_CHUNK])
    except ValueError as e:
        raise ValueError(f"{path}: unreadable {JSON_CHUNK!r} chunk ({e})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: the {JSON_CHUNK!r} chunk is not a JSON object")
    return params


def _tmp_name(path: Path) -> Path:
    """The temporary name a write goes to before its rename; what a killed writer left there is removed first."""
    cleanup_stale(path.parent, path.name)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def save_png(image: np.ndarray, path: Path, parameters: dict | None = None) -> None:
    """Write an [H, W, 3] uint8 image to `path` via a temporary name; parameters go into text chunks."""
    info = png_info(png_text(parameters)) if parameters else PngImagePlugin.PngInfo()
    tmp = _tmp_name(path)
    try:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(array: np.ndarray, path: Path) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_image(image, vae_scale_factor: int, latent_channels: int = 4) -> np.ndarray:
    """PIL image, path, or numpy -> float32 [B, 3, H, W] in [-1, 1] (H, W rounded down to multiples of the VAE
    factor, resized with Lanczos), or [B, 4, h, w] latents passed through untouched.
    # ref: diffusers VaeImageProcessor.preprocess (resize, pil_to_numpy, normalize)"""
    if isinstance(image, (str, Path)):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    if isinstance(image, Image.Image):
        w, h = (x - x % vae_scale_factor for x in image.size)
        if w <= 0 or h <= 0:
            raise ValueError(f"image of {image.size[0]}x{image.size[1]} is smaller than {vae_scale_factor} pixels")
        image = image.resize((w, h), resample=Image.LANCZOS).convert("RGB")
        x = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # [H, W, 3] in [0, 1]
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None] * 2 - 1, dtype=np.float32)
    x = np.asarray(image)
    if x.ndim == 4 and x.shape[1] == latent_channels:
        return x.astype(np.float32)
    if x.dtype == np.uint8:
        return load_image(Image.fromarray(x if x.ndim == 3 else x[0]), vae_scale_factor, latent_channels)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"image array of shape {list(x.shape)}: expected [H, W, 3], [B, H, W, 3] or [B, 4, h, w]")
    if x.shape[1] % vae_scale_factor or x.shape[2] % vae_scale_factor:
        raise ValueError(f"image array of {x.shape[2]}x{x.shape[1]}: sides must be multiples of {vae_scale_factor}")
    x = x.transpose(0, 3, 1, 2).astype(np.float32)
    return np.ascontiguousarray(x if x.min() < 0 else x * 2 - 1)  # negative values: already in [-1, 1]
