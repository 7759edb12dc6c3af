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
    # the text encoders and the VAE recompile from the model cache; the UNet from its IR (a cache hit would hold
    # the IR's pages and the blob at once)
    lean_blobs = set(tmp_path.glob("*.blob"))
    SDXLPipeline(ov_dir, precision="f32", cache_dir=tmp_path)(**KW)
    assert lean_blobs and len(set(tmp_path.glob("*.blob")) - lean_blobs) == 1  # the UNet's


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


def _resident_bytes(path) -> int:
    """This process's resident bytes of the mappings of the file `path`, or of the files under the folder `path`
    (from /proc/self/smaps)."""
    import os

    target, total, current = os.path.realpath(path), 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                current = parts[5].strip() if len(parts) == 6 else None
            elif parts[0] == "Rss:" and current and (current == target or current.startswith(target + os.sep)):
                total += int(parts[1]) * 1024
    return total


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="needs Linux /proc/self/smaps")
def test_compiling_drops_the_ir_weight_pages_and_outputs_stay_the_same(tiny, tmp_path):
    """OpenVINO keeps an IR's .bin mapped after compiling; the runtime drops the pages it read (madvise), so the
    compiled model's memory is not counted twice. The outputs are those of a model compiled without the drop."""
    import openvino as ov

    from runtime import ov_model
    from runtime.ov_model import OVModel, drop_mapped_pages

    _, ov_dir = tiny("base")
    xml = ov_dir / "unet" / "openvino_model.xml"
    core = ov.Core()
    static = {"sample": [2, 4, 16, 16], "timestep": [1], "encoder_hidden_states": [2, 77], "text_embeds": [2],
              "time_ids": [2]}  # fmt: skip
    inputs = {}
    for port in core.read_model(xml).inputs:  # the dims the tiny model fixes (widths) from the IR, the rest here
        name, ps = port.get_any_name(), port.get_partial_shape()
        shape = [d.get_length() if d.is_static else static[name][i] for i, d in enumerate(ps)]
        inputs[name] = np.full(shape, 500 if name == "timestep" else 0.5, np.float32)
    model = OVModel(core, xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    dropped = model(inputs)["out_sample"]
    # the compiled model still maps the file, none of it resident until a call reads a page again
    bin_path = xml.with_suffix(".bin")
    kept = OVModel(core, xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ov_model, "drop_mapped_pages", lambda *paths: 0)
        reference = kept(inputs)["out_sample"]
        held = _resident_bytes(bin_path)
    np.testing.assert_array_equal(dropped, reference)
    assert held > 0  # without the drop the IR's pages stay resident
    assert drop_mapped_pages(bin_path) > 0
    assert _resident_bytes(bin_path) < held
    np.testing.assert_array_equal(kept(inputs)["out_sample"], reference)  # pages come back from the file

    # compiled from the model cache: the blob's pages go the same way
    cache = tmp_path / "cache"
    core.set_property({"CACHE_DIR": str(cache)})
    OVModel(core, xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(inputs)  # fills the cache
    warm = OVModel(core, xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    warm.compile({k: v.shape for k, v in inputs.items()})
    assert any(cache.glob("*.blob")) and _resident_bytes(cache) == 0
    np.testing.assert_array_equal(warm(inputs)["out_sample"], reference)
