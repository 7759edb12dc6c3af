"""Run the same generation through diffusers (torch, fp32) and through our runtime (f32), return both."""

from __future__ import annotations

from functools import cache

import numpy as np

# our scheduler names -> (diffusers class, config overrides) as a diffusers user would swap them
DIFFUSERS_SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


@cache
def diffusers_pipe(src: str, img2img: bool = False):
    import diffusers
    import torch

    cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
    pipe = cls.from_pretrained(src, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler = pipe.scheduler
    return pipe


@cache
def our_pipe(ov_dir: str):
    from runtime.pipeline import SDXLPipeline

    return SDXLPipeline(ov_dir, precision="f32", cache_dir=None)


def run_diffusers(src, seed: int, scheduler: str | None = None, img2img: bool = False, on_step_end=None, around=None,
                  **kwargs):  # fmt: skip
    """-> (final latents [N, 4, h, w] float32, images [N, H, W, 3] uint8 or None)

    on_step_end(pipe, i, t, callback_kwargs) -> callback_kwargs: a callback_on_step_end of the test's (run before
    the latents are kept; pass callback_on_step_end_tensor_inputs for what it changes); around(pipe): a context
    manager the call runs in (e.g. a DeepCache helper enabled on the pipe and disabled after)."""
    import contextlib

    import diffusers
    import torch

    pipe = diffusers_pipe(str(src), img2img)
    pipe.scheduler = pipe.original_scheduler
    if scheduler is not None:
        cls_name, overrides = DIFFUSERS_SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.original_scheduler.config, **overrides)
    captured = {}

    def keep_latents(p, i, t, cb_kwargs):
        if on_step_end is not None:
            cb_kwargs = on_step_end(p, i, t, cb_kwargs)
        captured["latents"] = cb_kwargs["latents"].detach().clone()
        return cb_kwargs

    output_type = kwargs.pop("output_type", "np")
    with around(pipe) if around is not None else contextlib.nullcontext():
        out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
                   callback_on_step_end=keep_latents, **kwargs)  # fmt: skip
    if output_type == "latent":
        return out.images.numpy(), None
    images = (out.images * 255).round().astype(np.uint8)  # what diffusers' numpy_to_pil does
    return captured["latents"].numpy(), images


def run_ours(ov_dir, seed: int, **kwargs):
    kwargs.setdefault("output_type", "np")
    # diffusers' defaults, stated: our pipeline fills what is left out from the folder's presets (LCM: 4 steps,
    # guidance 1 or 8), which is what a user wants but not what a diffusers call without them does
    kwargs.setdefault("num_inference_steps", 50)
    kwargs.setdefault("guidance_scale", 5.0)
    result = our_pipe(str(ov_dir))(seed=seed, **kwargs)
    return result.latents, result.images


def assert_parity(ours, theirs, atol_latents: float = 1e-3, max_pixel_diff: int = 2):
    (lat, img), (ref_lat, ref_img) = ours, theirs
    assert lat.shape == ref_lat.shape, (lat.shape, ref_lat.shape)
    err = float(np.abs(lat - ref_lat).max())
    assert err <= atol_latents, f"latents differ by {err:.2e} (max |ref| {np.abs(ref_lat).max():.2f})"
    if ref_img is not None:
        assert img.shape == ref_img.shape
        pix = int(np.abs(img.astype(np.int16) - ref_img.astype(np.int16)).max())
        assert pix <= max_pixel_diff, f"pixels differ by {pix}/255"
