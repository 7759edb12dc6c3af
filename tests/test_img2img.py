"""Image-to-image, the refiner and the base -> refiner hand-off against diffusers' pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.parity import assert_parity, run_diffusers, run_ours


def _image(width: int = 256, height: int = 192) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_refiner_img2img_strength(tiny, strength):
    src, ov_dir = tiny("refiner")
    kwargs = dict(prompt="a sharp photo", image=_image(), strength=strength, num_inference_steps=8)
    assert_parity(run_ours(ov_dir, seed=2, **kwargs), run_diffusers(src, seed=2, img2img=True, **kwargs))


def test_refiner_negative_prompt_and_aesthetic_score(tiny):
    src, ov_dir = tiny("refiner")
    kwargs = dict(prompt="a sharp photo", negative_prompt="blurry", image=_image(264, 200), strength=0.6,
                  num_inference_steps=5, aesthetic_score=7.5, negative_aesthetic_score=1.5, guidance_scale=8.0,
                  original_size=(512, 384), negative_original_size=(128, 128))  # fmt: skip
    assert_parity(run_ours(ov_dir, seed=4, **kwargs), run_diffusers(src, seed=4, img2img=True, **kwargs))


def test_img2img_on_base_folder(tiny):
    src, ov_dir = tiny("base")
    kwargs = dict(prompt="a cat", prompt_2="watercolor", negative_prompt="dog", image=_image(), strength=0.5,
                  num_inference_steps=6, target_size=(384, 512), negative_target_size=(64, 64))  # fmt: skip
    assert_parity(run_ours(ov_dir, seed=6, **kwargs), run_diffusers(src, seed=6, img2img=True, **kwargs))


@pytest.mark.parametrize("frac,size", [(0.8, (384, 640)), (0.5, (192, 256))])
def test_ensemble_of_experts(tiny, frac, size):
    """base with denoising_end=f hands its latents over undecoded; the refiner runs with denoising_start=f."""
    base_src, base_ov = tiny("base")
    ref_src, ref_ov = tiny("refiner")
    h, w = size
    common = dict(prompt="a castle on a hill", negative_prompt="fog", num_inference_steps=10)
    ours = run_ours(base_ov, seed=8, height=h, width=w, denoising_end=frac, output_type="latent", **common)
    theirs = run_diffusers(base_src, seed=8, height=h, width=w, denoising_end=frac, output_type="latent", **common)
    assert_parity(ours, theirs)
    ours = run_ours(ref_ov, seed=9, image=ours[0], denoising_start=frac, **common)
    theirs = run_diffusers(ref_src, seed=9, img2img=True, image=torch.from_numpy(theirs[0]), denoising_start=frac,
                           **common)  # fmt: skip
    assert_parity(ours, theirs)


def test_sdedit_refinement(tiny):
    """The seed notebook's mode: the base's final latents through the refiner's img2img at strength 0.3."""
    base_src, base_ov = tiny("base")
    ref_src, ref_ov = tiny("refiner")
    common = dict(prompt="a castle", num_inference_steps=6)
    ours = run_ours(base_ov, seed=1, height=192, width=256, output_type="latent", **common)
    theirs = run_diffusers(base_src, seed=1, height=192, width=256, output_type="latent", **common)
    assert_parity(ours, theirs)
    ours = run_ours(ref_ov, seed=1, image=ours[0], strength=0.3, **common)
    theirs = run_diffusers(ref_src, seed=1, img2img=True, image=torch.from_numpy(theirs[0]), strength=0.3, **common)
    assert_parity(ours, theirs)
