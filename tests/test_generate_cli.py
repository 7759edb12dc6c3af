"""python -m runtime.generate: outputs, metadata, the refiner modes, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests import cli
from tests.cli import assert_one_line_error
from tests.models import ROOT


def _cli(*args):
    return cli.run("runtime.generate", "--precision", "f32", "--cache-dir", "", "--quiet", *args)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


SMALL = ["--prompt", "a cat", "--steps", "3", "--height", "128", "--width", "192", "--seed", "4"]


def test_png_outputs_with_parameters(tiny, tmp_path):
    _, ov_dir = tiny("base")
    two = ["--num-images", "2", "--negative-prompt", "dog"]
    _ok(_cli("--model", ov_dir, *SMALL, *two, "--output", tmp_path / "x.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0.png", "x-1.png"]
    png = Image.open(tmp_path / "x-0.png")
    assert png.size == (192, 128)
    text = png.text["parameters"]
    assert text.startswith("a cat\nNegative prompt: dog\nSteps: 3, ") and "Seed: 4" in text and "Size: 192x128" in text
    assert json.loads(png.text["sdxl-openvino"])["num_inference_steps"] == 3
    _ok(_cli("--model", ov_dir, *SMALL, *two, "--output", tmp_path / "x.npy"))
    arr = np.load(tmp_path / "x.npy")
    assert arr.shape == (2, 128, 192, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[1], np.asarray(Image.open(tmp_path / "x-1.png")))
    _ok(_cli("--model", ov_dir, *SMALL, "--output-type", "latent", "--output", tmp_path / "lat.npy"))
    assert np.load(tmp_path / "lat.npy").shape == (1, 4, 16, 24)


def test_refiner_modes(tiny, tmp_path):
    _, base = tiny("base")
    _, refiner = tiny("refiner")
    _ok(_cli("--model", base, "--refiner", refiner, "--high-noise-frac", "0.8", *SMALL, "--output", tmp_path / "e.png"))
    _ok(_cli("--model", base, "--refiner", refiner, "--refiner-strength", "0.4", "--low-memory", *SMALL,
             "--output", tmp_path / "s.png"))  # fmt: skip
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("e.png", "s.png"))
    assert a.shape == b.shape == (128, 192, 3) and not np.array_equal(a, b)
    _ok(_cli("--model", refiner, "--image", tmp_path / "e.png", "--strength", "0.5", "--prompt", "sharp",
             "--steps", "4", "--output", tmp_path / "i.png"))  # fmt: skip
    assert Image.open(tmp_path / "i.png").size == (192, 128)


def test_refiner_shares_identical_irs(tiny):
    from runtime.pipeline import SDXLPipeline

    _, base = tiny("base")
    _, refiner = tiny("refiner")
    b = SDXLPipeline(base, cache_dir=None)
    r = SDXLPipeline(refiner, cache_dir=None, share_with=b)
    # the tiny base and refiner are built with the same text_encoder_2 and VAE weights
    assert sorted(r.shared) == ["text_encoder_2", "vae_decoder", "vae_encoder"]
    assert r.vae_decoder is b.vae_decoder and r.text_encoders[0] is b.text_encoders[1]


def test_bad_inputs(tiny, tmp_path):
    _, base = tiny("base")
    _, refiner = tiny("refiner")
    out = tmp_path / "o.png"
    partial = tmp_path / "partial"
    shutil.copytree(base, partial)
    shutil.rmtree(partial / "unet")
    cases = [
        (["--model", partial, *SMALL], "unet"),
        (["--model", base, *SMALL, "--height", "100"], "height=100 must be a positive multiple of 8"),
        (["--model", base, *SMALL, "--steps", "0"], "--steps=0 must be an integer of at least 1"),
        (["--model", base, *SMALL, "--guidance-scale", "-1"], "--guidance-scale=-1.0 must not be negative"),
        (["--model", base, *SMALL, "--scheduler", "heun_karras"], "heun_karras"),
        (["--model", refiner, *SMALL], "is a refiner: it cannot do text-to-image without an image"),
        (["--model", base, "--refiner", base, *SMALL], "not a refiner folder"),
        (["--model", base, "--refiner", refiner, "--high-noise-frac", "0.1", *SMALL], "denoising_end"),
        (["--model", base, "--refiner", refiner, "--high-noise-frac", "0.9999", *SMALL], "denoising_start"),
        (["--model", base, "--image", tmp_path / "missing.png", "--prompt", "x"], "cannot read image"),
        (["--model", base, "--image", ROOT / "README.md", "--prompt", "x"], "cannot read image"),
        (["--model", refiner, "--image", ROOT / "README.md", "--prompt", "x", "--strength", "1.5"], "strength=1.5"),
        (["--model", tmp_path / "nowhere", *SMALL], "no such model folder"),
    ]
    for args, needle in cases:
        assert_one_line_error(_cli(*args, "--output", out), needle)
    assert_one_line_error(_cli("--model", base, *SMALL, "--output", "/proc/x.png"), "not writable")
    assert_one_line_error(_cli("--model", base, *SMALL, "--output", tmp_path / "x.jpg"), ".png or .npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial"]


@pytest.mark.parametrize("prompt_arg", [["--prompt-2", "oil painting"], ["--clip-skip", "1"]])
def test_cli_matches_python_api(tiny, tmp_path, prompt_arg):
    from tests.parity import our_pipe

    _, base = tiny("base")
    _ok(_cli("--model", base, *SMALL, *prompt_arg, "--output", tmp_path / "c.png"))
    kw = {"prompt_2": "oil painting"} if prompt_arg[0] == "--prompt-2" else {"clip_skip": 1}
    ref = our_pipe(str(base))(prompt="a cat", num_inference_steps=3, height=128, width=192, seed=4, **kw).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "c.png")), ref)
