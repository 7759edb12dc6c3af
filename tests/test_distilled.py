"""SSD-1B, Vega and LCM (time_cond_proj_dim) tiny models against diffusers."""

from __future__ import annotations

import pytest

from tests.parity import assert_parity, run_diffusers, run_ours
from tests.test_img2img import _image


@pytest.mark.parametrize("kind", ["ssd-1b", "vega"])
def test_distilled_text2img(tiny, kind):
    src, ov_dir = tiny(kind)
    kwargs = dict(prompt="a fox in the snow", negative_prompt="blurry", height=192, width=256, num_inference_steps=5)
    assert_parity(run_ours(ov_dir, seed=21, **kwargs), run_diffusers(src, seed=21, **kwargs))


@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_lcm_text2img(tiny, steps, guidance):
    """LCMScheduler; guidance enters the UNet as the w-embedding (timestep_cond), one UNet pass per step."""
    src, ov_dir = tiny("lcm")
    kwargs = dict(prompt="a fox", height=256, width=192, num_inference_steps=steps, guidance_scale=guidance)
    assert_parity(run_ours(ov_dir, seed=steps, **kwargs), run_diffusers(src, seed=steps, **kwargs))


def test_lcm_img2img(tiny):
    src, ov_dir = tiny("lcm")
    kwargs = dict(prompt="a fox", image=_image(), strength=0.5, num_inference_steps=4, guidance_scale=8.0)
    assert_parity(run_ours(ov_dir, seed=3, **kwargs), run_diffusers(src, seed=3, img2img=True, **kwargs))


def test_lcm_folder_presets(tiny):
    """The folder's presets (runtime.params.ModelInfo.presets), which the CLI and the Python API both apply."""
    from runtime.params import ModelInfo

    _, lcm = tiny("lcm")
    _, base = tiny("base")
    lcm, base = ModelInfo.load(lcm), ModelInfo.load(base)
    assert lcm.presets(None, None, None) == {"scheduler": None, "num_inference_steps": 4, "guidance_scale": 8.0}
    assert lcm.presets(None, 6, 1.5) == {"scheduler": None, "num_inference_steps": 6, "guidance_scale": 1.5}
    assert base.presets(None, None, None) == {"scheduler": None, "num_inference_steps": 50, "guidance_scale": 5.0}
    # an LCM-LoRA'd UNet: no w-embedding, no CFG
    assert base.presets("lcm", None, None) == {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0}
