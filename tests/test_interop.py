"""Folders other OpenVINO pipelines load: --timestep-dtype i64 gives optimum-intel's UNet interface."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from convert.pipeline import convert_pipeline
from runtime.pipeline import SDXLPipeline
from tests.models import source_dir

KW = dict(prompt="a cat", negative_prompt="dog", height=192, width=256, num_inference_steps=3, seed=2)


@pytest.fixture(scope="module")
def i64_folder(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("interop") / "base-i64"
    return convert_pipeline(str(source_dir("base")), out, weight_format="fp32", timestep_dtype="i64",
                            log=lambda s: None, isolate=False)  # fmt: skip


def test_i64_timestep_folder_gives_the_same_picture(tiny, i64_folder):
    _, f32_folder = tiny("base")
    unet = ov.Core().read_model(i64_folder / "unet" / "openvino_model.xml")
    assert unet.input("timestep").get_element_type() == ov.Type.i64
    ours = SDXLPipeline(i64_folder, precision="f32", cache_dir=None)(**KW)
    ref = SDXLPipeline(f32_folder, precision="f32", cache_dir=None)(**KW)  # Euler's timesteps are integers here
    np.testing.assert_allclose(ours.latents, ref.latents, atol=1e-6)


def test_openvino_genai_loads_our_folder(i64_folder):
    genai = pytest.importorskip("openvino_genai", reason="openvino-genai is not installed (the [dev] extra has it)")
    pipe = genai.Text2ImagePipeline(str(i64_folder), "CPU")
    image = pipe.generate("a cat", width=256, height=192, num_inference_steps=2)
    assert list(image.shape) == [1, 192, 256, 3] and image.data.dtype == np.uint8
