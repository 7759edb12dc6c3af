"""Issue 19, everyday use: metadata that makes each PNG again, seeds, progress, outputs never overwritten
silently, long prompts warned about, errors in the CLI's words, the README's model table."""

from __future__ import annotations

import io
import json
import shlex
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from runtime.errors import RuntimeInputError
from runtime.pipeline import SDXLPipeline
from tests import cli
from tests.cli import assert_one_line_error
from tests.models import ROOT

FAST = ["--precision", "f32", "--cache-dir", ""]
SMALL = ["--prompt", "a cat", "--steps", "3", "--height", "128", "--width", "192"]
LONG = "a photo of a red cat on a blue chair " * 10 + "and a tiny green hat at the very end"


def _cli(*args):
    return cli.run("runtime.generate", *FAST, *args)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _fields(png) -> dict:
    """The `parameters` chunk's last line as a dict (A1111's `Key: value, Key: value`)."""
    last = Image.open(png).text["parameters"].splitlines()[-1]
    return dict(item.split(": ", 1) for item in last.split(", "))


def _json(png) -> dict:
    return json.loads(Image.open(png).text["sdxl-openvino"])


@pytest.fixture(scope="module")
def base_pipe(tiny):
    _, base = tiny("base")
    return SDXLPipeline(base, precision="f32", cache_dir=None)


# -- 1. metadata, each image made again from its own PNG ---------------------------------------------------------
def test_per_image_seeds_and_regenerate_from_png(tiny, tmp_path):
    _, base = tiny("base")
    # no --height/--width: the real size is recorded; --num-images 2 in the default per-image seed mode
    _ok(_cli("--quiet", "--model", base, "--prompt", "a cat", "--steps", "3", "--seed", "11", "--num-images", "2",
             "--output", tmp_path / "x.png"))  # fmt: skip
    for i in range(2):
        png = tmp_path / f"x-{i}.png"
        fields, recorded = _fields(png), _json(png)
        w, h = Image.open(png).size
        assert fields["Size"] == f"{w}x{h}" and (recorded["width"], recorded["height"]) == (w, h)
        assert fields["Seed"] == str(11 + i) and recorded["seed"] == 11 + i
        assert fields["Sampler"] == "Euler" and "Batch size" not in fields
        _ok(_cli("--quiet", "--from-png", png, "--output", tmp_path / f"again-{i}.png"))
        np.testing.assert_array_equal(_pixels(tmp_path / f"again-{i}.png"), _pixels(png))
    # image 1 of the batch is the single-image run with seed 12
    _ok(_cli("--quiet", "--model", base, "--prompt", "a cat", "--steps", "3", "--seed", "12",
             "--output", tmp_path / "single.png"))  # fmt: skip
    np.testing.assert_array_equal(_pixels(tmp_path / "single.png"), _pixels(tmp_path / "x-1.png"))


def test_batch_seed_mode_records_the_position(tiny, tmp_path):
    _, base = tiny("base")
    _ok(_cli("--quiet", "--model", base, *SMALL, "--seed", "7", "--seed-mode", "batch", "--num-images", "2",
             "--scheduler", "dpmpp_2m_karras", "--output", tmp_path / "b.png"))  # fmt: skip
    fields = _fields(tmp_path / "b-1.png")
    assert (fields["Seed"], fields["Batch size"], fields["Batch pos"]) == ("7", "2", "1")
    assert fields["Sampler"] == "DPM++ 2M Karras"
    _ok(_cli("--quiet", "--from-png", tmp_path / "b-1.png", "--output", tmp_path / "again.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "b-0.png", "b-1.png"]
    np.testing.assert_array_equal(_pixels(tmp_path / "again.png"), _pixels(tmp_path / "b-1.png"))
    # batch noise differs from per-image noise for image 1
    _ok(_cli("--quiet", "--model", base, *SMALL, "--seed", "7", "--num-images", "2", "--scheduler", "dpmpp_2m_karras",
             "--output", tmp_path / "p.png"))  # fmt: skip
    assert not np.array_equal(_pixels(tmp_path / "p-1.png"), _pixels(tmp_path / "b-1.png"))


def test_refiner_and_img2img_metadata(tiny, tmp_path):
    _, base = tiny("base")
    _, refiner = tiny("refiner")
    _ok(_cli("--quiet", "--model", base, "--refiner", refiner, "--high-noise-frac", "0.8", "--prompt", "a cat",
             "--steps", "3", "--seed", "3", "--output", tmp_path / "e.png"))  # fmt: skip
    fields = _fields(tmp_path / "e.png")
    w, h = Image.open(tmp_path / "e.png").size
    assert fields["Size"] == f"{w}x{h}" and fields["Refiner"] == str(refiner) and fields["Refiner switch at"] == "0.8"
    _ok(_cli("--quiet", "--model", base, "--refiner", refiner, "--refiner-strength", "0.4", *SMALL, "--seed", "3",
             "--output", tmp_path / "s.png"))  # fmt: skip
    assert _fields(tmp_path / "s.png")["Refiner strength"] == "0.4"
    _ok(_cli("--quiet", "--model", refiner, "--image", tmp_path / "e.png", "--strength", "0.5", "--prompt", "sharp",
             "--steps", "4", "--seed", "2", "--output", tmp_path / "i.png"))  # fmt: skip
    fields = _fields(tmp_path / "i.png")
    assert fields["Denoising strength"] == "0.5" and fields["Size"] == f"{w}x{h}"
    assert "Denoising strength" not in _fields(tmp_path / "e.png")
    for name in ("e", "s", "i"):
        _ok(_cli("--quiet", "--from-png", tmp_path / f"{name}.png", "--output", tmp_path / f"{name}2.png"))
        np.testing.assert_array_equal(_pixels(tmp_path / f"{name}2.png"), _pixels(tmp_path / f"{name}.png"))


def test_sampler_names_are_a1111s(tiny):
    from runtime.image import sampler_name
    from runtime.params import ModelInfo

    _, base = tiny("base")
    config = ModelInfo.load(base).scheduler_config  # EulerDiscreteScheduler
    expected = {None: "Euler", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
                "dpmpp_2m_karras": "DPM++ 2M Karras", "ddim": "DDIM", "lcm": "LCM",
                "EulerAncestralDiscreteScheduler": "Euler a", "DPMSolverMultistepScheduler": "DPM++ 2M"}  # fmt: skip
    assert {name: sampler_name(config, name) for name in expected} == expected
    karras = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert sampler_name(karras) == "DPM++ 2M Karras"  # the folder's default class, told apart by its config


def test_python_api_images_carry_their_metadata(base_pipe, tmp_path):
    kw = dict(prompt="a cat", num_inference_steps=3, height=128, width=128, seed=20)
    result = base_pipe(**kw, num_images_per_prompt=2, seed_mode="per-image")
    images = result.pil()
    assert "Seed: 21" in images[1].info["parameters"] and json.loads(images[1].info["sdxl-openvino"])["seed"] == 21
    single = base_pipe(**{**kw, "seed": 21})
    np.testing.assert_array_equal(result.images[1], single.images[0])
    result.save(tmp_path / "one.png", 1)
    png = Image.open(tmp_path / "one.png")
    assert png.text["parameters"] == images[1].info["parameters"]
    from runtime.image import png_info

    images[1].save(tmp_path / "pil.png", pnginfo=png_info(images[1].info))
    assert Image.open(tmp_path / "pil.png").text == png.text
    batch = base_pipe(**kw, num_images_per_prompt=2)  # the API's default: diffusers' batch noise
    assert [p["batch_pos"] for p in batch.image_parameters] == [0, 1] and batch.parameters["seed_mode"] == "batch"
    with pytest.raises(RuntimeInputError, match="seed_mode"):
        base_pipe.generate(**kw, seed_mode="each")


# -- 2. a random seed is printed ---------------------------------------------------------------------------------
def test_random_seed_is_printed(tiny, tmp_path):
    _, base = tiny("base")
    proc = _ok(_cli("--quiet", "--model", base, *SMALL, "--output-type", "latent", "--output", tmp_path / "a.npy"))
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("seed: "), proc.stderr
    seed = lines[0].split()[1]
    proc = _ok(_cli("--quiet", "--model", base, *SMALL, "--seed", seed, "--output-type", "latent",
                    "--output", tmp_path / "b.npy"))  # fmt: skip
    assert proc.stderr == ""
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


# -- 3. progress -------------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_rate_counts_denoising_steps_only():
    from runtime.generate import Progress

    clock, out = _Clock(), io.StringIO()
    progress = Progress(True, out, clock)
    progress.stage("load")
    clock.t = 10.0  # ten seconds of loading and compiling: not in it/s
    progress.stage("denoise")
    for i in range(4):
        clock.t += 0.5
        progress.step(i + 1, 8)
    assert "4/8" in out.getvalue() and "2.00 it/s" in out.getvalue() and "ETA 00:02" in out.getvalue()
    progress.stage("compile")  # the refiner's set-up, between two denoising stretches
    clock.t += 30.0
    progress.stage("denoise")
    clock.t += 2.0
    progress.step(5, 8)
    assert out.getvalue().rsplit("\r", 1)[-1].endswith("1.25 it/s")  # 5 steps in 4 s of denoising
    for stage in ("load", "denoise", "compile"):
        assert f"{stage} ..." in out.getvalue()
    progress.close()
    assert out.getvalue().endswith("\n")
    quiet = io.StringIO()
    off = Progress(False, quiet, clock)
    off.stage("load")
    off.step(1, 2)
    off.close()
    assert quiet.getvalue() == ""


def test_stages_reported_and_no_progress_off_a_terminal(base_pipe, tiny, tmp_path):
    stages = []
    gen = base_pipe.generate(prompt="a cat", num_inference_steps=2, height=128, width=128, seed=1,
                             on_stage=stages.append)  # fmt: skip
    gen.result()
    assert stages == ["encode", "compile", "denoise", "decode"]
    _, base = tiny("base")
    proc = _ok(_cli("--model", base, *SMALL, "--seed", "1", "--output", tmp_path / "x.png"))  # not --quiet
    assert proc.stderr == "" and proc.stdout.strip() == str(tmp_path / "x.png")


# -- 4. outputs are never replaced silently ----------------------------------------------------------------------
def test_existing_outputs_are_refused_before_any_work(tiny, tmp_path):
    _, base = tiny("base")
    nowhere = tmp_path / "no-model"  # the output is checked first: the model is never opened
    (tmp_path / "x.png").write_bytes(b"keep")
    assert_one_line_error(_cli("--model", nowhere, *SMALL, "--output", tmp_path / "x.png"), "exists; pass --overwrite")
    assert (tmp_path / "x.png").read_bytes() == b"keep"
    (tmp_path / "n-1.png").write_bytes(b"keep")  # every numbered name is checked
    assert_one_line_error(_cli("--model", nowhere, *SMALL, "--num-images", "3", "--output", tmp_path / "n.png"),
                          "n-1.png exists")  # fmt: skip
    (tmp_path / "dir.png").mkdir()
    assert_one_line_error(_cli("--model", nowhere, *SMALL, "--output", tmp_path / "dir.png"), "is a folder")
    assert_one_line_error(_cli("--model", nowhere, *SMALL, "--output", tmp_path / "missing" / "x.png"),
                          "does not exist")  # fmt: skip
    _ok(_cli("--quiet", "--model", base, *SMALL, "--seed", "1", "--overwrite", "--output", tmp_path / "x.png"))
    assert Image.open(tmp_path / "x.png").size == (192, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "n-1.png", "x.png"]


# -- 5. long prompts -----------------------------------------------------------------------------------------------
def test_long_prompt_warns_once_naming_the_dropped_text(base_pipe, tiny, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base_pipe(prompt=LONG, negative_prompt="blurry", num_inference_steps=1, height=128, width=128, seed=1,
                  output_type="latent")  # fmt: skip
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 1, messages  # both tokenizers cut it: one warning
    assert "CLIP can only handle sequences up to 77 tokens" in messages[0]
    assert "and a tiny green hat at the very end" in messages[0] and "blurry" not in messages[0]
    _, base = tiny("base")
    proc = _ok(_cli("--quiet", "--model", base, "--prompt", LONG, "--steps", "1", "--height", "128", "--width", "128",
                    "--seed", "1", "--output", tmp_path / "x.png"))  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "tiny green hat at the very end" in lines[0], proc.stderr


def test_short_prompts_do_not_warn(base_pipe):
    tokenizer = base_pipe.text_encoders[0].tokenizer
    texts = ["x " * 74, "x " * 75, "a cat", "x " * 76]
    assert [row for row, _ in tokenizer.truncated(texts, tokenizer(texts))] == [3]


# -- 6. errors speak the CLI's language; pasteable commands; the invoked name -------------------------------------
def test_errors_use_flag_names(tiny, tmp_path):
    from runtime.generate import cli_message

    assert cli_message("num_inference_steps=0 must be an integer of at least 1") == (
        "--steps=0 must be an integer of at least 1"
    )
    assert cli_message("no such model folder; prompt has 2 entries") == "no such model folder; prompt has 2 entries"
    assert cli_message("guidance_scale=-1.0 must not be negative") == "--guidance-scale=-1.0 must not be negative"
    _, base = tiny("base")
    assert_one_line_error(_cli("--model", base, *SMALL, "--num-images", "0", "--output", tmp_path / "x.png"),
                          "--num-images=0 must be an integer of at least 1")  # fmt: skip


def test_prog_is_the_invoked_name(monkeypatch):
    from runtime.generate import _prog

    monkeypatch.setattr(sys, "argv", ["/venv/bin/sdxl-ov-generate"])
    assert _prog() == "sdxl-ov-generate"
    monkeypatch.setattr(sys, "argv", ["/src/runtime/generate.py"])
    assert _prog() == "python -m runtime.generate"


def test_demo_prints_a_pasteable_command(monkeypatch, tmp_path, capsys):
    import subprocess

    import convert.demo as demo
    import convert.pipeline
    import convert.tiny

    calls = []
    monkeypatch.setattr(convert.tiny, "build_tiny_pipeline", lambda *a, **k: None)
    monkeypatch.setattr(convert.pipeline, "convert_pipeline", lambda *a, **k: None)
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    prompt = 'a lighthouse at dawn, it\'s "oil" $HOME'
    assert demo.main(["--out", str(tmp_path / "my demo"), "--prompt", prompt]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ "))
    assert shlex.split(line[2:]) == calls[0]


# -- 7. README and LICENSE ---------------------------------------------------------------------------------------
def test_readme_model_table_and_license():
    readme = (ROOT / "README.md").read_text()
    for hub_id in ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-refiner-1.0",
                   "segmind/SSD-1B", "segmind/Segmind-Vega", "segmind/Segmind-VegaRT", "latent-consistency/lcm-ssd-1b",
                   "latent-consistency/lcm-sdxl"):  # fmt: skip
        assert f"python -m convert {hub_id}" in readme or hub_id in readme, hub_id
    assert "sdxl-openvino/ov_cache" in readme and "--from-png" in readme and "--seed-mode" in readme
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
