"""Unit parity of the pieces where other OpenVINO pipelines differ from diffusers.

openvino.genai (measured by the issue's author): floors pixels where diffusers rounds, builds time ids
width-first, and swaps prompt/prompt_2 between the text encoders; its Euler betas drop the linspace endpoint
(that one is caught by tests/test_schedulers.py at 1e-6). Each test here fails for the deviating variant.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import conditioning
from runtime.image import to_uint8
from tests.parity import diffusers_pipe, our_pipe


def test_to_uint8_rounds_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    x = np.random.default_rng(0).uniform(-1.1, 1.1, (2, 3, 40, 24)).astype(np.float32)
    ref = VaeImageProcessor().postprocess(torch.from_numpy(x), output_type="np")
    ref = (ref * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
    np.testing.assert_array_equal(to_uint8(x), ref)
    floored = (np.clip(x / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    assert (floored != ref).mean() > 0.3  # a floor would not pass


def test_time_ids_height_first_like_diffusers(tiny):
    src, _ = tiny("base")
    pipe = diffusers_pipe(str(src))
    ref = pipe._get_add_time_ids((512, 768), (16, 32), (1024, 640), torch.float32, text_encoder_projection_dim=32)
    ours = conditioning.base_time_ids((512, 768), (16, 32), (1024, 640))
    np.testing.assert_array_equal(ours, ref.numpy()[0])
    assert not np.array_equal(conditioning.base_time_ids((768, 512), (32, 16), (640, 1024)), ref.numpy()[0])


def test_refiner_time_ids_like_diffusers(tiny):
    src, _ = tiny("refiner")
    pipe = diffusers_pipe(str(src), True)
    pos, neg = pipe._get_add_time_ids((512, 768), (8, 0), (512, 768), 6.5, 2.0, (256, 384), (0, 4), (256, 384),
                                      torch.float32, text_encoder_projection_dim=32)  # fmt: skip
    np.testing.assert_array_equal(conditioning.refiner_time_ids((512, 768), (8, 0), 6.5), pos.numpy()[0])
    np.testing.assert_array_equal(conditioning.refiner_time_ids((256, 384), (0, 4), 2.0), neg.numpy()[0])


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_encode_prompt_like_diffusers(tiny, clip_skip):
    """prompt goes to text_encoder and prompt_2 to text_encoder_2 (a swap fails this)."""
    from runtime.text import encode_prompt

    src, ov_dir = tiny("base")
    pipe = diffusers_pipe(str(src))
    kwargs = dict(prompt=["a red cube", "a blue sphere"], prompt_2=["oil painting", "pencil sketch"],
                  negative_prompt=["blurry", ""], negative_prompt_2=None)  # fmt: skip
    with torch.no_grad():
        ref = pipe.encode_prompt(**kwargs, device="cpu", num_images_per_prompt=2, do_classifier_free_guidance=True,
                                 clip_skip=clip_skip)  # fmt: skip
    ours = encode_prompt(our_pipe(str(ov_dir)).text_encoders, **kwargs, num_images_per_prompt=2, do_cfg=True,
                         force_zeros_for_empty_prompt=True, clip_skip=clip_skip)  # fmt: skip
    for got, want in zip((ours.embeds, ours.negative_embeds, ours.pooled, ours.negative_pooled), ref, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    swapped = encode_prompt(our_pipe(str(ov_dir)).text_encoders, kwargs["prompt_2"], kwargs["prompt"], None, None,
                            2, True, True, clip_skip)  # fmt: skip
    assert np.abs(swapped.embeds - ref[0].numpy()).max() > 1e-2


def test_guidance_embedding_and_rescale_like_diffusers(tiny):
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    src, _ = tiny("lcm")
    pipe = diffusers_pipe(str(src))
    for w, dim in [(7.0, 16), (0.0, 256), (2.5, 15), (7.0, 256)]:
        ref = pipe.get_guidance_scale_embedding(torch.tensor([w, w]), embedding_dim=dim).numpy()
        # sin/cos of arguments up to 7000: a 1-ulp difference in torch's float32 exp (not correctly rounded)
        # moves the argument by up to 5e-4 rad
        np.testing.assert_allclose(conditioning.guidance_embedding(w, 2, dim), ref, atol=1e-3)
    g = np.random.default_rng(1)
    guided, text = (
        g.standard_normal((2, 4, 6, 5)).astype(np.float32),
        g.standard_normal((2, 4, 6, 5)).astype(np.float32),
    )
    ref = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(text), guidance_rescale=0.7).numpy()
    np.testing.assert_allclose(conditioning.rescale_guidance(guided, text, 0.7), ref, atol=1e-6)
