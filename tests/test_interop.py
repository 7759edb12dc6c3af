"""Folders other OpenVINO pipelines load: --timestep-dtype i64 gives optimum-intel's UNet interface."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from runtime.pipeline import SDXLPipeline
from tests.models import ov_dir

KW = dict(prompt="a cat", negative_prompt="dog", height=192, width=256, num_inference_steps=3, seed=2)


@pytest.fixture(scope="module")
def i64_folder(tiny):
    """convert --timestep-dtype i64 (fp32), cached: the benchmark smoke test runs openvino.genai on it too."""
    return ov_dir("base", timestep_dtype="i64")


def test_i64_timestep_folder_gives_the_same_picture(tiny, i64_folder):
    _, f32_folder = tiny("base")
    unet = ov.Core().read_model(i64_folder / "unet" / "openvino_model.xml")
    assert unet.input("timestep").get_element_type() == ov.Type.i64
    ours = SDXLPipeline(i64_folder, precision="f32", cache_dir=None)(**KW)
    ref = SDXLPipeline(f32_folder, precision="f32", cache_dir=None)(**KW)  # Euler's timesteps are integers here
    np.testing.assert_allclose(ours.latents, ref.latents, atol=1e-6)


@pytest.mark.parametrize("negative_prompt", ["dog", None])
def test_openvino_genai_makes_our_picture_from_our_folder(i64_folder, negative_prompt):
    """genai loads the folder and, drawing torch's noise (its TorchGenerator) for the same seed, makes the picture
    our runtime makes, within the standing pixel tolerance (square: genai builds time ids width-first)."""
    genai = pytest.importorskip("openvino_genai", reason="openvino-genai is not installed (the [dev] extra has it)")
    pipe = genai.Text2ImagePipeline(str(i64_folder), "CPU", INFERENCE_PRECISION_HINT="f32")
    kw = dict(width=256, height=256, num_inference_steps=3, guidance_scale=5.0)
    extra = {"negative_prompt": negative_prompt} if negative_prompt else {}
    theirs = pipe.generate("a cat", generator=genai.TorchGenerator(2), **kw, **extra).data
    ours = SDXLPipeline(i64_folder, precision="f32", cache_dir=None)(
        prompt="a cat", negative_prompt=negative_prompt, seed=2, **kw
    ).images
    assert theirs.shape == ours.shape == (1, 256, 256, 3) and theirs.dtype == np.uint8
    assert ours.std() > 10  # a picture, not a flat image
    assert int(np.abs(theirs.astype(np.int16) - ours.astype(np.int16)).max()) <= 2
