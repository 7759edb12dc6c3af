"""The Python API: per-step state, the compile cache, shape reuse, devices and option errors."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import RuntimeInputError
from runtime.pipeline import SDXLPipeline

KW = dict(prompt="a cat", negative_prompt="dog", height=128, width=192, num_inference_steps=4, seed=3)


def test_steps_are_yielded_and_match_the_result(tiny):
    _, ov_dir = tiny("base")
    pipe = SDXLPipeline(ov_dir, precision="f32", cache_dir=None)
    gen = pipe.generate(**KW)
    states = list(gen)
    assert [s.index for s in states] == [0, 1, 2, 3] and all(s.total == 4 for s in states)
    assert [s.timestep for s in states] == [751.0, 501.0, 251.0, 1.0]  # SDXL's leading spacing, steps_offset 1
    assert all(s.denoised is not None and s.denoised.shape == (1, 4, 16, 24) for s in states)
    result = gen.result()
    np.testing.assert_array_equal(result.latents, states[-1].latents)
    again = pipe(**KW)  # same shapes: the compiled UNet is reused, the numbers are the same
    np.testing.assert_array_equal(again.images, result.images)
    assert len(pipe.unet._compiled) == 1
    assert result.pil()[0].size == (192, 128)


def test_compile_cache_is_written_and_reused(tiny, tmp_path):
    _, ov_dir = tiny("base")
    first = SDXLPipeline(ov_dir, precision="f32", cache_dir=tmp_path)(**KW)
    blobs = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".blob")
    assert len(blobs) >= 4  # text encoders, UNet, VAE decoder
    second = SDXLPipeline(ov_dir, precision="f32", cache_dir=tmp_path)(**KW)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".blob") == blobs  # reused, none added
    np.testing.assert_array_equal(first.images, second.images)


def test_bf16_default_precision_runs(tiny):
    _, ov_dir = tiny("base")
    f32 = SDXLPipeline(ov_dir, precision="f32", cache_dir=None)(**KW)
    default = SDXLPipeline(ov_dir, cache_dir=None)(**KW)  # the device's default (bf16 on this CPU)
    assert default.images.shape == f32.images.shape
    assert np.abs(default.latents - f32.latents).max() < 0.5  # same picture, lower precision arithmetic


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(device="NPU9"), "device 'NPU9' not available"),
        (dict(precision="f64"), "precision 'f64'"),
    ],
)
def test_bad_pipeline_options(tiny, kwargs, needle):
    _, ov_dir = tiny("base")
    with pytest.raises(RuntimeInputError, match=needle):
        SDXLPipeline(ov_dir, cache_dir=None, **kwargs)


def test_bad_call_options(tiny):
    _, ov_dir = tiny("base")
    pipe = SDXLPipeline(ov_dir, precision="f32", cache_dir=None)
    with pytest.raises(TypeError, match="unknown parameter"):
        pipe(prompt="x", guidance=3)
    with pytest.raises(RuntimeInputError, match="latents have shape"):
        pipe(**{**KW, "latents": np.zeros((1, 4, 8, 8), np.float32)})
    with pytest.raises(RuntimeInputError, match="prompt_2 has 1 entries but prompt has 2"):
        pipe(**{**KW, "prompt": ["a", "b"], "negative_prompt": None, "prompt_2": ["c"]})


def test_low_memory_releases_each_stage_and_gives_the_same_picture(tiny, tmp_path):
    _, ov_dir = tiny("base")
    normal = SDXLPipeline(ov_dir, precision="f32", cache_dir=None)(**KW)
    pipe = SDXLPipeline(ov_dir, precision="f32", cache_dir=tmp_path, low_memory=True)
    lean = pipe(**KW)
    np.testing.assert_array_equal(lean.images, normal.images)
    compiled = [m._compiled for m in (pipe.unet, pipe.vae_decoder, *(e.encoder for e in pipe.text_encoders))]
    assert all(not c for c in compiled)  # nothing stays compiled between generations


def test_default_mode_frees_activation_buffers_between_stages_and_keeps_the_compiled_models(tiny, monkeypatch):
    """Without --low-memory every model stays compiled; after its stage only its intermediate buffers are freed
    (CompiledModel.release_memory), so that the UNet's and the VAE's activations do not add up. The next
    generation allocates them again and gives the same picture."""
    from runtime.ov_model import OVModel

    _, ov_dir = tiny("base")
    pipe = SDXLPipeline(ov_dir, precision="f32", cache_dir=None)
    trimmed = []
    original = OVModel.trim
    monkeypatch.setattr(OVModel, "trim", lambda self: (trimmed.append(self.name), original(self))[1])
    first = pipe(**KW)
    assert trimmed == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    models = (pipe.unet, pipe.vae_decoder, *(e.encoder for e in pipe.text_encoders))
    compiled = {m.name: list(m._compiled.values()) for m in models}
    assert all(compiled.values())
    second = pipe(**KW)
    np.testing.assert_array_equal(second.images, first.images)
    assert {m.name: list(m._compiled.values()) for m in models} == compiled  # the same objects: no recompile
