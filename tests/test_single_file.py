"""A single .safetensors in the original Stability (SGM) layout, as model sites distribute SDXL checkpoints:
written from the tiny base pipeline, loaded back by diffusers, converted in-process and through the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import openvino as ov
import pytest
import torch

from convert.errors import ConvertError
from convert.pipeline import convert_pipeline
from tests import cli
from tests.cli import assert_one_line_error
from tests.single_file import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, write_single_file

CORE = ov.Core()
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    src, _ = tiny("base")
    return write_single_file(src, tmp_path_factory.mktemp("single") / "tiny_sdxl_base.safetensors")


@pytest.fixture(scope="module")
def configs(tiny, tmp_path_factory):
    """The tiny base folder without its weights: what `--config` needs (configs, tokenizers, scheduler)."""
    src, _ = tiny("base")
    out = tmp_path_factory.mktemp("configs") / "tiny-base-configs"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


def _cli(*args):
    return cli.run("convert", *args)


def test_file_round_trips_through_diffusers(tiny, checkpoint, configs):
    """diffusers' single-file loader detects the file as SDXL base and recovers every tensor exactly."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file

    src, _ = tiny("base")
    ckpt = load_file(checkpoint)
    assert infer_diffusers_model_type(ckpt) == "xl_base"
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPEN_CLIP_PREFIX)) for k in ckpt)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    ):
        assert key in ckpt, key
    assert ckpt["conditioner.embedders.1.model.text_projection"].shape == (64, 32)  # [hidden, projection]
    assert ckpt["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # a 1x1 convolution in LDM

    ref = StableDiffusionXLPipeline.from_pretrained(src, dtype=torch.float32)
    # configs only: every weight can only come from the file
    for config in (configs, src):
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(checkpoint), config=str(config), torch_dtype=torch.float32
        )
        for name in COMPONENTS:
            got, want = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
            assert got.keys() == want.keys(), name
            for key, value in want.items():
                assert not got[key].is_meta, f"{name}.{key} not loaded"
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{name}.{key}"


def _ir_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49408, (2, 77), generator=g).numpy()
    return {
        "unet": {
            "sample": torch.randn(2, 4, 8, 12, generator=g).numpy(),
            "timestep": np.array([501.0], np.float32),
            "encoder_hidden_states": torch.randn(2, 77, 96, generator=g).numpy(),
            "text_embeds": torch.randn(2, 32, generator=g).numpy(),
            "time_ids": np.array([[64, 96, 0, 0, 64, 96]] * 2, np.float32),
        },
        "text_encoder": {"input_ids": ids},
        "text_encoder_2": {"input_ids": ids},
        "vae_decoder": {"latent_sample": torch.randn(1, 4, 8, 12, generator=g).numpy()},
    }


def _run(folder, ir, inputs):
    model = CORE.compile_model(folder / ir / "openvino_model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = model(inputs)
    return {port.get_any_name(): result[port] for port in model.outputs}


@pytest.fixture(scope="module")
def cli_converted(checkpoint, configs, tmp_path_factory):
    """The documented form: the checkpoint plus a folder of configs (no weights) to build the models from."""
    parent = tmp_path_factory.mktemp("cli")
    out = parent / "out"
    proc = _cli(checkpoint, out, "--config", configs, "--weight-format", "fp32")
    return proc, out, parent


def test_cli_converts_single_file(cli_converted):
    proc, out, parent = cli_converted
    assert proc.returncode == 0, proc.stderr
    assert "(single-file, StableDiffusionXLPipeline)" in proc.stdout
    for ir in ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"):
        assert (out / ir / "openvino_model.xml").is_file(), ir
        assert any(line.startswith(ir) and "max|diff|" in line for line in proc.stdout.splitlines()), ir
    assert [p.name for p in parent.iterdir()] == ["out"]


def test_single_file_conversion_matches_folder_conversion(tiny, checkpoint, cli_converted):
    _, ov_dir = tiny("base")
    proc, out, _ = cli_converted
    assert proc.returncode == 0, proc.stderr
    for ir, inputs in _ir_inputs().items():
        got, want = _run(out, ir, inputs), _run(ov_dir, ir, inputs)
        assert got.keys() == want.keys(), ir
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=f"{ir}:{name}")
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((ov_dir / name).read_text()), name
    for tok in ("tokenizer", "tokenizer_2"):
        for f in (ov_dir / tok).iterdir():
            if f.suffix == ".xml":  # the graph's auto-generated node names differ from run to run
                continue
            assert (out / tok / f.name).read_bytes() == f.read_bytes(), f"{tok}/{f.name}"
    info = json.loads((out / "convert_info.json").read_text())
    assert info["source"] == str(checkpoint) and set(info["submodels"]) == {
        "text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"}  # fmt: skip


def test_cli_refuses_a_file_that_is_not_sdxl(configs, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    bogus = tmp_path / "classifier.safetensors"
    save_file({"backbone.0.weight": torch.randn(16, 3, 3, 3, generator=g), "backbone.0.bias": torch.zeros(16),
               "head.weight": torch.randn(10, 16, generator=g)}, bogus)  # fmt: skip
    assert_one_line_error(_cli(bogus, tmp_path / "out", "--config", configs, "--weight-format", "fp32"),
                           "not a Stable Diffusion checkpoint")  # fmt: skip
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}, sd15)  # fmt: skip
    assert_one_line_error(_cli(sd15, tmp_path / "out"), "Stable Diffusion 1.x/2.x")
    assert_one_line_error(_cli(tmp_path / "old.ckpt", tmp_path / "out"), "no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.safetensors", "sd15.safetensors"]


def test_incomplete_file_is_refused(checkpoint, configs, tmp_path):
    """Tensors missing from the file are left on torch's meta device by diffusers: refused, not traced."""
    from safetensors.torch import load_file, save_file

    layer = CLIP_PREFIX + "text_model.encoder.layers.1."
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in load_file(checkpoint).items() if not k.startswith(layer)}, partial)
    with pytest.raises(ConvertError, match="text_encoder weights are incomplete: 16 tensors missing"):
        convert_pipeline(str(partial), tmp_path / "out", weight_format="fp32", config=str(configs), isolate=False,
                         log=lambda s: None)  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["partial.safetensors"]
