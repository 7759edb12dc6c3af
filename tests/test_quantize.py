"""--quantize-unet: calibration through the runtime, NNCF int8/hybrid quantization, the fidelity report, bad input.

Random weights make the fidelity figures a check of the mechanism (the quantized UNet is used and stays close
to the unquantized one), not of image quality."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import numpy as np
import openvino as ov
import pytest

from convert import quantize
from convert.pipeline import _quantize_unet, convert_pipeline
from runtime.pipeline import SDXLPipeline
from tests import cli, models
from tests.cli import assert_one_line_error

CORE = ov.Core()
PROMPTS = ["a lighthouse on a cliff", "a bowl of fruit, oil painting"]


def _calibration(**kw) -> quantize.Calibration:
    return quantize.Calibration(**{"prompts": PROMPTS, "size": 4, "steps": 3, "report_samples": 1, **kw})


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """quantized(kind, mode) -> a folder with its UNet quantized, once per module. base int8: `convert
    --quantize-unet` from the diffusers folder (fp16 elsewhere), the whole path; the others: the same step
    (convert.pipeline._quantize_unet: calibrate, quantize, report) on a copy of a cached converted folder, which
    spares a whole conversion each."""
    done = {}

    def get(kind: str, mode: str = "int8"):
        if (kind, mode) not in done:
            out = tmp_path_factory.mktemp("q") / f"{kind}-{mode}"
            if (kind, mode) == ("base", "int8"):
                convert_pipeline(str(models.source_dir(kind)), out, weight_format="fp16", log=lambda s: None,
                                 isolate=False, quantize_unet=mode, calibration=_calibration())  # fmt: skip
            else:
                shutil.copytree(models.ov_dir(kind, "fp16" if kind == "base" else "fp32"), out)
                _quantize_unet(out, mode, _calibration(), isolate=False, log=lambda s: None)
            done[(kind, mode)] = out
        return done[(kind, mode)]

    return get


def _producer(op, port: int):
    node = op.input_value(port).get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Transpose"):  # FakeQuantize may sit before these
        node = node.input_value(0).get_node()
    return node


def _weight_is_int8(op) -> bool:
    """The weight input is a decompression subgraph of an int8/uint8 constant (FakeQuantize folded or not)."""
    stack = [op.input_value(1).get_node()]
    while stack:
        node = stack.pop()
        if node.get_type_name() == "Constant" and node.get_output_element_type(0).get_type_name() in ("i8", "u8"):
            return True
        if node.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape", "FakeQuantize", "Transpose"):
            stack.extend(node.input_value(i).get_node() for i in range(node.get_input_size()))
    return False


def _unet(folder):
    return CORE.read_model(folder / "unet" / "openvino_model.xml")


def test_int8_quantizes_activations_and_weights_but_keeps_sensitive_layers(quantized):
    info = json.loads((quantized("base") / "convert_info.json").read_text())  # convert --quantize-unet records it
    assert info["unet_quantization"]["mode"] == "int8" and info["unet_quantization"]["ir_bytes"] > 0
    model = _unet(quantized("base"))
    convs = [op for op in model.get_ops() if op.get_type_name() == "Convolution"]
    kept = set(quantize.sensitive_ops(model))
    assert {name.split("/")[0].rsplit(".", 1)[-1] for name in kept} == {"conv_in", "conv_out"}
    for op in convs:
        fq_in = _producer(op, 0).get_type_name() == "FakeQuantize"
        assert fq_in == (op.get_friendly_name() not in kept), op.get_friendly_name()
        assert _weight_is_int8(op) == (op.get_friendly_name() not in kept), op.get_friendly_name()
    weighted = set(quantize.weighted_ops(_unet(models.ov_dir("base", "fp16"))))  # names from the unquantized IR
    matmuls = [op for op in model.get_ops() if op.get_type_name() == "MatMul" and op.get_friendly_name() in weighted]
    assert matmuls and all(_producer(op, 0).get_type_name() == "FakeQuantize" and _weight_is_int8(op)
                           for op in matmuls)  # fmt: skip
    assert quantize.op_counts(model)["FakeQuantize"] > len(convs)


def test_hybrid_compresses_matmul_weights_and_quantizes_convolutions(quantized):
    model = _unet(quantized("base", "hybrid"))
    weighted = set(quantize.weighted_ops(_unet(models.ov_dir("base", "fp16"))))
    matmuls = [op for op in model.get_ops() if op.get_type_name() == "MatMul" and op.get_friendly_name() in weighted]
    assert matmuls
    for op in matmuls:  # weight-only: int8 weights, activations left alone
        assert _weight_is_int8(op), op.get_friendly_name()
        assert _producer(op, 0).get_type_name() != "FakeQuantize", op.get_friendly_name()
    kept = set(quantize.sensitive_ops(model))
    convs = [op for op in model.get_ops() if op.get_type_name() == "Convolution" and op.get_friendly_name() not in kept]
    assert convs and all(_producer(op, 0).get_type_name() == "FakeQuantize" for op in convs)


@pytest.mark.parametrize("mode", ["int8", "hybrid"])
def test_runtime_generates_with_the_quantized_unet_and_the_report_is_right(quantized, mode):
    folder = quantized("base", mode)
    report = json.loads((folder / quantize.REPORT_FILE).read_text())
    assert report["mode"] == mode
    assert report["calibration"]["samples"] == 4 and report["quantize"]["samples"] == 4
    (sample,) = report["fidelity"]["samples"]
    # Regenerate the report's sample with the quantized folder and with an unquantized conversion of the same
    # source: the figures match, and the quantized UNet differs from the unquantized one (it is the one used).
    s = report["fidelity"]["settings"]
    assert s["inference_precision"] in ("f32", "bf16", "f16")
    job = dict(prompt=sample["prompt"], seed=sample["seed"], num_inference_steps=s["steps"], height=s["height"],
               width=s["width"], guidance_scale=s["guidance_scale"])  # fmt: skip
    q = SDXLPipeline(folder, cache_dir=None)(**job)
    r = SDXLPipeline(models.ov_dir("base", "fp16"), cache_dir=None)(**job)
    assert q.images.dtype == np.uint8 and q.images.shape == r.images.shape
    rel = float(np.linalg.norm(q.latents - r.latents) / np.linalg.norm(r.latents))
    assert rel == pytest.approx(sample["latents_rel_error"], rel=1e-5)
    assert quantize.psnr(q.images, r.images) == pytest.approx(sample["psnr_db"], rel=1e-6)
    assert 0 < rel < 0.5 and np.isfinite(sample["psnr_db"]) and sample["psnr_db"] > 15


def test_refiner_calibrates_on_the_low_noise_steps(tmp_path):
    folder = models.ov_dir("refiner", "fp32")
    facts = quantize.calibrate(folder, tmp_path / "s.npz", asdict(_calibration(steps=10, size=3)))
    samples = quantize.load_samples(tmp_path / "s.npz")
    assert facts["samples"] == len(samples) == 3
    assert all(s["time_ids"].shape[-1] == 5 for s in samples)  # aesthetic-score micro-conditioning
    assert all(float(s["timestep"].ravel()[0]) < 350 for s in samples)  # strength 0.3: the last 30 % of 1000
    out = tmp_path / "unet" / "openvino_model.xml"
    q = quantize.quantize(folder / "unet" / "openvino_model.xml", tmp_path / "s.npz", "int8", out)
    assert q["ops"]["FakeQuantize"] > 0


def test_lcm_unet_quantizes_with_timestep_cond(quantized):
    folder = quantized("lcm")
    model = _unet(folder)
    assert "timestep_cond" in [p.get_any_name() for p in model.inputs]
    assert quantize.op_counts(model)["FakeQuantize"] > 0
    result = SDXLPipeline(folder, cache_dir=None)(prompt="a cat", num_inference_steps=2, seed=3)
    assert np.isfinite(result.latents).all() and result.images.shape[-1] == 3


def test_calibration_visits_evenly_spaced_steps(tmp_path):
    folder = models.ov_dir("base", "fp32")
    quantize.calibrate(folder, tmp_path / "s.npz", asdict(_calibration(steps=5, size=6)))
    samples = quantize.load_samples(tmp_path / "s.npz")
    timesteps = [float(s["timestep"].ravel()[0]) for s in samples]
    pipe = SDXLPipeline(folder, cache_dir=None)
    plan = pipe.generate(prompt="x", num_inference_steps=5).plan
    # 6 calls over 2 prompts: 3 per prompt, at steps 0, 2 and 4 of the sampler's own timesteps
    expected = [float(plan.timesteps[i]) for i in (0, 2, 4)] * 2
    assert timesteps == pytest.approx(expected)
    assert samples[0]["sample"].shape[0] == 2  # guided: the batch-2 call


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--calibration-size", "0"], "--calibration-size 0"),
        (["--calibration-steps", "0"], "--calibration-steps 0"),
        (["--calibration-resolution", "100x9"], "multiple of 8"),
        (["--calibration-resolution", "big"], "expected HxW"),
        (["--report-samples", "-1"], "--report-samples"),
        (["--calibration-prompts", "{missing}"], "cannot read"),
        (["--calibration-prompts", "{empty}"], "no prompts"),
    ],
)
def test_bad_calibration_input(tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [a.format(missing=tmp_path / "nope.txt", empty=tmp_path / "empty.txt") for a in args]
    out = tmp_path / "out"
    proc = cli.run("convert", models.source_dir("base"), out, "--quantize-unet", "int8", *args)
    assert_one_line_error(proc, needle)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_calibration_options_need_quantize_unet_and_output_must_not_exist(tmp_path):
    proc = cli.run("convert", models.source_dir("base"), tmp_path / "out", "--calibration-size", "8")
    assert_one_line_error(proc, "needs --quantize-unet")
    (tmp_path / "exists").mkdir()
    proc = cli.run("convert", models.source_dir("base"), tmp_path / "exists", "--quantize-unet", "int8")
    assert_one_line_error(proc, "exists")


def test_lean_quantization_where_f32_statistics_would_not_fit(tmp_path, monkeypatch):
    from nncf.openvino import engine

    folder = models.ov_dir("base", "fp32")
    xml = folder / "unet" / "openvino_model.xml"
    assert quantize.statistics_precision(CORE.read_model(xml)) == "f32"  # a tiny UNet fits anywhere
    monkeypatch.setattr(quantize, "_memory_total", lambda: 2**20)
    assert quantize.statistics_precision(CORE.read_model(xml)) == "default"
    quantize.calibrate(folder, tmp_path / "s.npz", asdict(_calibration(size=2)))
    original = engine.OVNativeEngine.__init__
    facts = quantize.quantize(xml, tmp_path / "s.npz", "int8", tmp_path / "q" / "openvino_model.xml")
    assert facts["statistics_precision"] == "default" and not facts["smooth_quant"]
    assert engine.OVNativeEngine.__init__ is original  # NNCF is left as it was
    # lean int8: weights compressed first, then activations quantized; the same layers as the standard mode
    lean, standard = CORE.read_model(tmp_path / "q" / "openvino_model.xml"), CORE.read_model(xml)
    kept = set(quantize.sensitive_ops(standard))
    convs = [op for op in lean.get_ops() if op.get_type_name() == "Convolution"]
    assert kept and len(convs) > len(kept)
    for op in convs:
        quantized = op.get_friendly_name() not in kept
        assert (_producer(op, 0).get_type_name() == "FakeQuantize") == quantized, op.get_friendly_name()
        assert _weight_is_int8(op) == quantized, op.get_friendly_name()
    weighted = set(quantize.weighted_ops(standard))
    matmuls = [op for op in lean.get_ops() if op.get_type_name() == "MatMul" and op.get_friendly_name() in weighted]
    assert matmuls and all(_weight_is_int8(op) for op in matmuls)
    # activations quantized everywhere but in the two embedding MLPs fed by a Concat (time, added conditions)
    unquantized = [op.get_friendly_name() for op in matmuls if _producer(op, 0).get_type_name() != "FakeQuantize"]
    assert all("time_embedding" in n or "add_embedding" in n for n in unquantized), unquantized
