"""Inpainting and outpainting equal diffusers' StableDiffusionXLInpaintPipeline (v0.42) for the same seed: a
4-channel UNet (base, LCM, the refiner's half of the ensemble) and a 9-channel inpainting UNet, non-square
sizes, padding_mask_crop, mask blur, strength 1.0 and 0.6; bad masks get one-line errors."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from PIL import Image

from runtime.errors import RuntimeInputError
from tests.cli import assert_one_line_error, run
from tests.inpaint_models import inpaint_dirs
from tests.parity import assert_parity, our_pipe

PROMPT = "a red fox in the snow"


@cache
def _diffusers(src: str):
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(src, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(src, seed: int, **kwargs):
    """-> (final latents, uint8 images or None): the inpaint pipeline's call with a torch generator."""
    import torch

    captured = {}

    def keep(p, i, t, cb):
        captured["latents"] = cb["latents"].detach().clone()
        return cb

    output_type = kwargs.pop("output_type", "np")
    out = _diffusers(str(src))(generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
                               callback_on_step_end=keep, **kwargs)  # fmt: skip
    if output_type == "latent":
        return out.images.numpy(), None
    if output_type == "pil":
        return captured["latents"].numpy(), np.stack([np.asarray(im) for im in out.images])
    return captured["latents"].numpy(), (out.images * 255).round().astype(np.uint8)


def run_ours(ov_dir, seed: int, **kwargs):
    kwargs.setdefault("output_type", "np")
    if kwargs["output_type"] == "pil":  # ours gives uint8 arrays either way
        kwargs["output_type"] = "np"
    result = our_pipe(str(ov_dir))(seed=seed, **kwargs)
    return result.latents, result.images


def run_cli(*args):
    return run("runtime.generate", *args, timeout=300)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (an upscaled noise grid), so that resizing matters."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
    return small.resize((width, height), Image.BICUBIC)


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    m = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def base(tiny):
    return tiny("base")


@pytest.fixture(scope="module")
def inpainting_model():
    return inpaint_dirs()


COMMON = dict(prompt=PROMPT, guidance_scale=5.0)


@pytest.mark.parametrize(
    "case",
    [
        dict(size=(96, 64), strength=0.6, steps=4),  # non-square, SDEdit-like start
        dict(size=(64, 64), strength=1.0, steps=3, scheduler="euler_a"),  # pure noise; step noise after the draws
    ],
    ids=["96x64-strength-0.6", "64x64-strength-1.0-euler-a"],
)
def test_four_channel_parity(base, case):
    src, ov = base
    w, h = case["size"]
    image, mask = picture(w, h), box_mask(w, h, (16, 8, 56, 40))
    kw = dict(COMMON, image=image, mask_image=mask, width=w, height=h, strength=case["strength"],
              num_inference_steps=case["steps"])  # fmt: skip
    sched = case.get("scheduler")
    theirs_kw = dict(kw)
    if sched == "euler_a":
        import diffusers

        pipe = _diffusers(str(src))
        original = pipe.scheduler
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(original.config)
        try:
            theirs = run_diffusers(src, 11, **theirs_kw)
        finally:
            pipe.scheduler = original
        kw["scheduler"] = "euler_a"
    else:
        theirs = run_diffusers(src, 11, **theirs_kw)
    assert_parity(run_ours(ov, 11, **kw), theirs)


def test_padding_mask_crop_and_blur_parity(base):
    """The mask's box (padded, grown to the output's aspect) inpainted at 64x64 and pasted back into the 96x80
    original; the blurred mask (mask_processor.blur) shapes the paste."""
    src, ov = base
    image, mask = picture(96, 80, seed=1), box_mask(96, 80, (40, 30, 60, 44))
    blurred = _diffusers(str(src)).mask_processor.blur(mask, blur_factor=3)
    kw = dict(COMMON, image=image, width=64, height=64, num_inference_steps=3, strength=0.8, padding_mask_crop=6)
    theirs = run_diffusers(src, 5, mask_image=blurred, output_type="pil", **kw)
    ours = run_ours(ov, 5, mask_image=mask, mask_blur=3, **kw)
    assert ours[1].shape == (1, 80, 96, 3)
    assert_parity(ours, theirs)
    outside = np.asarray(blurred) == 0  # untouched pixels are the original's
    assert (ours[1][0][outside] == np.asarray(image)[outside]).all()


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_nine_channel_parity(inpainting_model, strength):
    src, ov = inpainting_model
    image, mask = picture(64, 96, seed=2), box_mask(64, 96, (8, 24, 48, 72))
    kw = dict(COMMON, image=image, mask_image=mask, width=64, height=96, strength=strength, num_inference_steps=4)
    assert_parity(run_ours(ov, 3, **kw), run_diffusers(src, 3, **kw))


def test_refiner_ensemble_parity(base, tiny):
    """diffusers' documented recipe: the base inpaints to denoising_end and hands its latents over, the refiner's
    inpaint pipeline finishes from denoising_start with the same mask."""
    src, ov = base
    ref_src, ref_ov = tiny("refiner")
    image, mask = picture(64, 64, seed=3), box_mask(64, 64, (8, 8, 40, 48))
    kw = dict(COMMON, mask_image=mask, width=64, height=64, num_inference_steps=5)
    theirs_lat, _ = run_diffusers(src, 9, image=image, denoising_end=0.7, output_type="latent", **kw)
    ours_lat, _ = run_ours(ov, 9, image=image, denoising_end=0.7, output_type="latent", **kw)
    assert_parity((ours_lat, None), (theirs_lat, None))
    import torch

    theirs = run_diffusers(ref_src, 9, image=torch.from_numpy(theirs_lat), denoising_start=0.7, **kw)
    ours = run_ours(ref_ov, 9, image=ours_lat, denoising_start=0.7, **kw)
    assert_parity(ours, theirs)
    # the same chain as one call: SDXLPipeline(base, refiner=...) with high_noise_frac
    from runtime.pipeline import SDXLPipeline

    chained = SDXLPipeline(ov, precision="f32", cache_dir=None, refiner=our_pipe(str(ref_ov)))
    result = chained(seed=9, image=image, high_noise_frac=0.7, output_type="np", **kw)
    assert np.array_equal(result.latents, ours[0]) and np.array_equal(result.images, ours[1])


def test_lcm_parity(tiny):
    """LCM (w-embedding UNet, step noise) at diffusers' default inpainting strength 0.9999."""
    src, ov = tiny("lcm")
    image, mask = picture(64, 64, seed=4), box_mask(64, 64, (0, 16, 64, 40))
    kw = dict(prompt=PROMPT, image=image, mask_image=mask, width=64, height=64, num_inference_steps=3,
              guidance_scale=8.0)  # fmt: skip
    ours = run_ours(ov, 21, **kw)
    assert our_pipe(str(ov)).generate(seed=21, **kw).params.strength == 0.9999
    assert_parity(ours, run_diffusers(src, 21, **kw))


def test_outpaint_keeps_the_image(base):
    """Outpainting: the padded image and its border mask; the kept region stays near the original (4-channel
    blend: only the VAE round trip changes it)."""
    from runtime.inpaint import outpaint

    _, ov = base
    image = picture(48, 48, seed=5)
    padded, mask = outpaint(image, 8, 0, 8, 13)
    assert padded.size == (64, 64) and mask.size == (64, 64)  # 48 + 13 rounded up to 64
    m = np.asarray(mask)
    assert m[:, :8].all() and m[:, 56:].all() and m[48:].all() and not m[:48, 8:56].any()
    _, images = run_ours(ov, 1, prompt=PROMPT, image=padded, mask_image=mask, width=64, height=64,
                         num_inference_steps=2, strength=1.0)  # fmt: skip
    assert images.shape == (1, 64, 64, 3)


def test_bad_masks(base, tmp_path):
    _, ov = base
    pipe = our_pipe(str(ov))
    image = picture(64, 64)
    text = tmp_path / "mask.txt"
    text.write_text("not an image")
    cases = [
        (dict(mask_image=box_mask(48, 64, (0, 0, 8, 8))), "48x64 but the image is 64x64"),
        (dict(mask_image=str(text)), "not a readable image"),
        (dict(mask_image=42), "must be an image"),
        (dict(mask_image=Image.new("L", (64, 64))), "all zero"),
        (dict(mask_image=np.zeros((64, 64), np.float32)), "all zero"),
        (dict(mask_image=box_mask(64, 64, (0, 0, 8, 8)), image=None), "needs an image"),
        (dict(mask_image=box_mask(64, 64, (0, 0, 8, 8)), padding_mask_crop=-1), "padding_mask_crop=-1"),
        (dict(padding_mask_crop=4), "need a mask_image"),
    ]
    for extra, needle in cases:
        kw = dict(prompt=PROMPT, image=image, num_inference_steps=2, height=64, width=64) | extra
        with pytest.raises(RuntimeInputError, match=needle):
            pipe.generate(seed=0, **kw)


def test_inpainting_model_needs_a_mask(inpainting_model):
    _, ov = inpainting_model
    with pytest.raises(RuntimeInputError, match="inpainting UNet"):
        our_pipe(str(ov)).generate(prompt=PROMPT, seed=0, num_inference_steps=2, height=64, width=64)


def test_cli(base, tmp_path):
    """--image --mask writes an image of the input's size; a bad mask exits 2 in one line; --outpaint pads the
    image and makes the border mask (its kwargs checked in-process: no second model load)."""
    import argparse

    from runtime.inpaint_cli import inpaint_kwargs

    _, ov = base
    picture(64, 48).save(tmp_path / "in.png")
    box_mask(64, 48, (8, 8, 40, 40)).save(tmp_path / "mask.png")
    Image.new("L", (64, 48)).save(tmp_path / "black.png")
    common = ["--model", ov, "--prompt", "x", "--steps", "2", "--image", tmp_path / "in.png"]
    proc = run_cli(*common, "--mask", tmp_path / "mask.png", "--padding-mask-crop", "4", "--output",
                   tmp_path / "a.png")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "a.png").size == (64, 48)
    assert_one_line_error(
        run_cli(*common, "--mask", tmp_path / "black.png", "--output", tmp_path / "c.png"), "all zero"
    )
    args = dict(image=tmp_path / "in.png", mask=None, outpaint="8,0,8,0", padding_mask_crop=None, mask_blur=None,
                strength=None, height=None, width=None)  # fmt: skip
    kw = inpaint_kwargs(argparse.Namespace(**args))
    assert kw["image"].size == kw["mask_image"].size == (80, 48) and (kw["width"], kw["height"]) == (80, 48)
    for bad, needle in (("8,x", "--outpaint 8,x"), ("0,0,0,0", "not all 0"), ("1,2,3", "LEFT,TOP")):
        with pytest.raises(RuntimeInputError, match=needle):
            inpaint_kwargs(argparse.Namespace(**(args | dict(outpaint=bad))))
    with pytest.raises(RuntimeInputError, match="choose one"):
        inpaint_kwargs(argparse.Namespace(**(args | dict(mask=tmp_path / "mask.png"))))
