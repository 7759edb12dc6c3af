"""convert/: folder layout and IR names, per-submodel parity with torch, weight formats, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import openvino as ov
import pytest
import torch

from convert.errors import ConvertError
from convert.pipeline import convert_pipeline
from tests import cli, models
from tests.cli import assert_one_line_error

KINDS = ["base", "refiner", "ssd-1b", "vega", "lcm"]
CORE = ov.Core()


def _compile(path):
    return CORE.compile_model(CORE.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _names(ports):
    return [p.get_any_name() for p in ports]


@pytest.mark.parametrize("kind", KINDS)
def test_layout_and_names(tiny, kind):
    _, ov_dir = tiny(kind)
    subs = {"unet", "vae_decoder", "vae_encoder", "text_encoder_2", "tokenizer_2", "scheduler"}
    if kind != "refiner":
        subs |= {"text_encoder", "tokenizer"}
    assert {p.name for p in ov_dir.iterdir() if p.is_dir()} == subs
    index = json.loads((ov_dir / "model_index.json").read_text())
    assert index["requires_aesthetics_score"] is (kind == "refiner")
    assert index["force_zeros_for_empty_prompt"] is (kind != "refiner")
    for sub in subs - {"scheduler", "tokenizer", "tokenizer_2"}:
        assert (ov_dir / sub / "openvino_model.xml").is_file() and (ov_dir / sub / "config.json").is_file()
    unet = CORE.read_model(ov_dir / "unet" / "openvino_model.xml")
    expected = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    unet_cfg = json.loads((ov_dir / "unet" / "config.json").read_text())
    if kind == "lcm":
        expected.append("timestep_cond")
        assert unet_cfg["time_cond_proj_dim"] == 16
    assert _names(unet.inputs) == expected and _names(unet.outputs) == ["out_sample"]
    assert unet.input("timestep").get_element_type() == ov.Type.f32
    n_ids = 5 if kind == "refiner" else 6
    assert unet.input("time_ids").get_partial_shape()[1].get_length() == n_ids
    te2 = CORE.read_model(ov_dir / "text_encoder_2" / "openvino_model.xml")
    assert _names(te2.outputs)[:2] == ["text_embeds", "last_hidden_state"]
    assert _names(te2.outputs)[2:] == [f"hidden_states.{i}" for i in range(5)]  # 4 layers + embeddings
    assert _names(CORE.read_model(ov_dir / "vae_decoder" / "openvino_model.xml").inputs) == ["latent_sample"]
    assert _names(CORE.read_model(ov_dir / "vae_encoder" / "openvino_model.xml").outputs) == ["latent_parameters"]
    sched = json.loads((ov_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == ("LCMScheduler" if kind == "lcm" else "EulerDiscreteScheduler")
    info = json.loads((ov_dir / "convert_info.json").read_text())
    for name, sub in info["submodels"].items():
        assert sub["max_abs_diff"] <= 1e-4, name  # the check done at conversion, on its example inputs


@pytest.mark.parametrize("kind", KINDS)
def test_unet_parity_other_shapes(tiny, kind):
    """The IR is dynamic in batch and size: check it against torch at shapes other than the traced ones."""
    from diffusers import UNet2DConditionModel

    src, ov_dir = tiny(kind)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet").eval()
    compiled = _compile(ov_dir / "unet" / "openvino_model.xml")
    cfg = unet.config
    n_ids = 5 if kind == "refiner" else 6
    for batch, h, w in [(1, 48, 80), (3, 80, 48)]:
        g = torch.Generator().manual_seed(batch)
        inputs = {
            "sample": torch.randn(batch, 4, h, w, generator=g),
            "timestep": torch.tensor([981.5]),
            "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[h * 8.0, w * 8.0, 0, 0, h * 8.0, w * 8.0][:n_ids]] * batch),
        }
        kwargs = {}
        if cfg.time_cond_proj_dim:
            inputs["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, generator=g)
            kwargs["timestep_cond"] = inputs["timestep_cond"]
        with torch.no_grad():
            ref = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                       added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
                       **kwargs).sample.numpy()  # fmt: skip
        got = compiled({k: v.numpy() for k, v in inputs.items()})["out_sample"]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_text_encoders_and_vae_parity(tiny):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    src, ov_dir = tiny("base")
    ids = torch.randint(0, 49408, (3, 77), generator=torch.Generator().manual_seed(7))
    te = CLIPTextModel.from_pretrained(src, subfolder="text_encoder").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2").eval()
    with torch.no_grad():
        r1, r2 = te(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
    o1 = _compile(ov_dir / "text_encoder" / "openvino_model.xml")({"input_ids": ids.numpy()})
    o2 = _compile(ov_dir / "text_encoder_2" / "openvino_model.xml")({"input_ids": ids.numpy()})
    np.testing.assert_allclose(o1["pooler_output"], r1.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(o1["hidden_states.2"], r1.hidden_states[-2].numpy(), atol=1e-4)
    np.testing.assert_allclose(o2["text_embeds"], r2.text_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(o2["hidden_states.3"], r2.hidden_states[-2].numpy(), atol=1e-4)

    vae = AutoencoderKL.from_pretrained(src, subfolder="vae").eval()
    x = torch.rand(2, 3, 72, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 9, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moments = vae.encode(x).latent_dist.parameters.numpy()
        image = vae.decode(z).sample.numpy()
    enc = _compile(ov_dir / "vae_encoder" / "openvino_model.xml")({"sample": x.numpy()})["latent_parameters"]
    dec = _compile(ov_dir / "vae_decoder" / "openvino_model.xml")({"latent_sample": z.numpy()})["sample"]
    np.testing.assert_allclose(enc, moments, atol=1e-4)
    np.testing.assert_allclose(dec, image, atol=1e-4)


def test_loader_carries_checkpoint_weights(tiny):
    """The torch model the converter traces holds the file's tensors, not a re-initialisation."""
    from safetensors.numpy import load_file

    from convert.source import Loader, resolve

    src, _ = tiny("base")
    loader = Loader(resolve(str(src)), torch.float32)
    for name, file in [("text_encoder", "model.safetensors"), ("unet", "diffusion_pytorch_model.safetensors")]:
        saved = load_file(src / name / file)
        state = {k: v.numpy() for k, v in loader.load(name).state_dict().items()}
        assert len(saved) >= 10
        for key, value in saved.items():
            match = state.get(key)
            if match is None:  # transformers 5 saves CLIP keys without the `text_model.` prefix
                match = (
                    state[f"text_model.{key}"]
                    if f"text_model.{key}" in state
                    else state[key.removeprefix("text_model.")]
                )
            np.testing.assert_array_equal(match, value, err_msg=key)


def test_checkpoint_with_missing_weights_is_refused(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    src, _ = tiny("base")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    f = broken / "text_encoder" / "model.safetensors"
    tensors = load_file(f)
    save_file({k: v for k, v in tensors.items() if "layers.1." not in k}, f)
    with pytest.raises(ConvertError, match="text_encoder weights do not match"):
        convert_pipeline(str(broken), tmp_path / "out", weight_format="fp32", log=lambda s: None, isolate=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt,expected", [("fp16", ov.Type.f16), ("int8", ov.Type.u8), ("int4", ov.Type.i4)])
def test_weight_formats(tiny, tmp_path, fmt, expected):
    src, _ = tiny("base")
    if fmt == "fp16":  # the cached fp16 conversion (tests.models.ov_dir: convert_pipeline, other tests use it)
        out = models.ov_dir("base", "fp16")
    else:
        out = convert_pipeline(str(src), tmp_path / fmt, weight_format=fmt, log=lambda s: None, isolate=False)
    unet = CORE.read_model(out / "unet" / "openvino_model.xml")
    types = {op.get_output_element_type(0) for op in unet.get_ops() if op.get_type_name() == "Constant"}
    assert expected in types, types
    info = json.loads((out / "convert_info.json").read_text())
    assert info["weight_format"] == fmt and set(info["submodels"]) >= {"unet", "vae_decoder"}


# -- bad input: one line on stderr, exit code 2, nothing left behind ---------------------------------------
def _cli(*args):
    return cli.run("convert", *args)


def _write_index(folder, cls):
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": cls, "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    return folder


def test_bad_sources(tmp_path, tiny):
    assert_one_line_error(_cli(tmp_path / "nope", tmp_path / "o1"), "not a diffusers folder")
    assert_one_line_error(_cli(tmp_path / "nope.safetensors", tmp_path / "o1"), "no such file")
    sd15 = _write_index(tmp_path / "sd15", "StableDiffusionPipeline")
    assert_one_line_error(_cli(sd15, tmp_path / "o2"), "Stable Diffusion 1.x/2.x")
    weird = _write_index(tmp_path / "weird", "MyFancyPipeline")
    assert_one_line_error(_cli(weird, tmp_path / "o3"), "unknown pipeline class 'MyFancyPipeline'")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(_cli(empty, tmp_path / "o4"), "no model_index.json")
    src, _ = tiny("base")
    partial = tmp_path / "partial"
    shutil.copytree(src, partial)
    (partial / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert_one_line_error(_cli(partial, tmp_path / "o5"), "unet/ has no weights file")
    no_vae = tmp_path / "no_vae"
    shutil.copytree(src, no_vae)
    shutil.rmtree(no_vae / "vae")
    assert_one_line_error(_cli(no_vae, tmp_path / "o6"), "vae/ is missing")
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())


def test_bad_outputs(tmp_path, tiny):
    src, _ = tiny("base")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_one_line_error(_cli(src, existing), "exists; pass --overwrite")
    assert (existing / "keep.txt").read_text() == "mine"
    assert_one_line_error(_cli(src, "/proc/sdxl-openvino-out"), "cannot write there")
    assert_one_line_error(_cli(src, tmp_path / "no" / "such" / "dir"), "does not exist")


def test_failed_conversion_leaves_nothing(tmp_path, tiny, monkeypatch):
    from convert import check

    src, _ = tiny("base")
    monkeypatch.setitem(check.TOLERANCE, "fp32", -1.0)  # every check fails
    with pytest.raises(ConvertError, match="differs from torch"):
        convert_pipeline(str(src), tmp_path / "out", weight_format="fp32", log=lambda s: None, isolate=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path, tiny):
    src, _ = tiny("refiner")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = _cli(src, out, "--overwrite", "--weight-format", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "old.txt").exists() and (out / "unet" / "openvino_model.xml").is_file()
    for name in ("text_encoder_2", "unet", "vae_decoder"):  # progress: name, params, seconds, size
        assert any(line.startswith(name) and "M params" in line and "MiB" in line for line in proc.stdout.splitlines())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_16bit_trace_leaves_torch_as_it_was(tmp_path):
    """OpenVINO's 16-bit tracing patch replaces torch.bmm process-wide with a stub that returns a constant;
    convert.export undoes it, so torch computes the same after a conversion in this process."""
    from convert.export import trace
    from convert.wrappers import Spec

    class Bmm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4).half()

        def forward(self, a, b):
            return torch.bmm(self.proj(a.half()).float(), b)

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 4, 5, generator=gen)
    product, bmm = torch.bmm(a, b), torch.bmm
    torch.manual_seed(0)  # the Linear's initial weights
    module = Bmm()
    spec = Spec(module, {"a": a, "b": b}, {"a": [-1, 3, 4], "b": [-1, 4, 5]}, ["out"])
    trace(spec, tmp_path / "m", "fp16")
    assert torch.bmm is bmm and torch.equal(torch.bmm(a, b), product)
    assert module.proj.weight.dtype == torch.float16  # its own 16-bit weight back, not the fp32 placeholder
    xml = tmp_path / "m" / "openvino_model.xml"
    compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    w, bias = module.proj.weight.float(), module.proj.bias.float()
    with torch.no_grad():
        want = torch.bmm(a @ w.T + bias, b).numpy()  # the traced model computes in f32 with the f16 weights
    np.testing.assert_allclose(compiled({"a": a.numpy(), "b": b.numpy()})[0], want, rtol=1e-5, atol=1e-5)
