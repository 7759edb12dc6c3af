"""Text-to-image parity: diffusers (torch fp32) and our runtime (f32) give the same latents and pixels."""

from __future__ import annotations

import pytest

from tests.parity import DIFFUSERS_SCHEDULERS, assert_parity, run_diffusers, run_ours

SMALL = dict(height=192, width=256, num_inference_steps=4)  # non-square, cheap

CASES = {
    "negative-given": dict(prompt="a photo of a cat", negative_prompt="blurry, low quality", guidance_scale=7.5),
    "negative-none": dict(prompt="a photo of a cat", guidance_scale=7.5),
    "negative-empty": dict(prompt="a photo of a cat", negative_prompt="", guidance_scale=7.5),
    "prompt-2": dict(prompt="a cat", prompt_2="oil painting, thick brush strokes", negative_prompt="dog",
                     negative_prompt_2="photo", guidance_scale=6.0),
    "guidance-1": dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=1.0),
    "guidance-rescale": dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=7.5,
                             guidance_rescale=0.7),
    "clip-skip-1": dict(prompt="a photo of a cat", negative_prompt="blurry", clip_skip=1),
    "micro-conditioning": dict(prompt="a cat", negative_prompt="ugly", original_size=(512, 384),
                               crops_coords_top_left=(16, 32), target_size=(1024, 768),
                               negative_original_size=(256, 256), negative_crops_coords_top_left=(0, 8),
                               negative_target_size=(128, 640)),
    "two-prompts-two-images": dict(prompt=["a cat", "a dog on a skateboard"], negative_prompt=["blurry", "ugly"],
                                   num_images_per_prompt=2, guidance_scale=7.5),
    "micro-conditioning-batch": dict(prompt=["a cat", "a dog"], num_images_per_prompt=2, original_size=(512, 384),
                                     negative_original_size=(256, 256), negative_target_size=(128, 640)),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_text2img_parity(tiny, case):
    src, ov_dir = tiny("base")
    kwargs = {**SMALL, **CASES[case]}
    assert_parity(run_ours(ov_dir, seed=11, **kwargs), run_diffusers(src, seed=11, **kwargs))


@pytest.mark.parametrize("height,width", [(640, 384), (384, 640)])
def test_text2img_parity_sizes(tiny, height, width):
    src, ov_dir = tiny("base")
    kwargs = dict(prompt="a lighthouse", negative_prompt="fog", height=height, width=width, num_inference_steps=3)
    assert_parity(run_ours(ov_dir, seed=5, **kwargs), run_diffusers(src, seed=5, **kwargs))


@pytest.mark.parametrize("scheduler", list(DIFFUSERS_SCHEDULERS))
def test_text2img_parity_schedulers(tiny, scheduler):
    src, ov_dir = tiny("base")
    kwargs = dict(SMALL, prompt="a red bicycle", negative_prompt="blurry", num_inference_steps=6)
    ours = run_ours(ov_dir, seed=3, scheduler=scheduler, **kwargs)
    assert_parity(ours, run_diffusers(src, seed=3, scheduler=scheduler, **kwargs))


def test_latents_in_and_latent_output(tiny):
    import numpy as np

    src, ov_dir = tiny("base")
    start = np.random.default_rng(0).standard_normal((1, 4, 24, 32)).astype(np.float32)
    kwargs = dict(SMALL, prompt="a cat", latents=start)
    ours = run_ours(ov_dir, seed=0, **kwargs)
    import torch

    theirs = run_diffusers(src, seed=0, **{**kwargs, "latents": torch.from_numpy(start)})
    assert_parity(ours, theirs)
    from tests.parity import our_pipe

    result = our_pipe(str(ov_dir))(seed=0, output_type="latent", **kwargs)
    assert result.images is None and np.abs(result.latents - theirs[0]).max() <= 1e-3
