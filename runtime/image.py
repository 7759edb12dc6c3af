"""Images in and out: VAE output -> uint8, PNG with generation parameters, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, rounded as diffusers rounds.
    # ref: diffusers VaeImageProcessor.postprocess + numpy_to_pil"""
    x = np.clip(decoded / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1)
    return (x * np.float32(255)).round().astype(np.uint8)


def a1111_parameters(p: dict) -> str:
    """The `parameters` text chunk A1111-style tools read."""
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [
        ("Steps", p.get("num_inference_steps")),
        ("Sampler", p.get("scheduler")),
        ("CFG scale", p.get("guidance_scale")),
        ("Seed", p.get("seed")),
        ("Size", f"{p.get('width')}x{p.get('height')}"),
        ("Model", p.get("model")),
        ("Clip skip", p.get("clip_skip")),
        ("CFG rescale", p.get("guidance_rescale") or None),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def save_png(image: np.ndarray, path: Path, parameters: dict | None = None) -> None:
    """Write an [H, W, 3] uint8 image to `path` via a temporary name; parameters go into text chunks."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", a1111_parameters(parameters))
        info.add_text("sdxl-openvino", json.dumps(parameters))
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
