"""fuse_lora() / unfuse_lora() at run time (runtime/lora_fuse.py) against diffusers' fuse_lora on the tiny SDXL:
the adapters in force baked into the weights, lora_scale, a switch while fused, unfusing, the CLI's --fuse-lora
and its refusals."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import RuntimeInputError
from tests import cli, parity
from tests.models import ov_dir
from tests.test_lora_runtime import _diffusers, _ours, _pipe, two_loras


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return two_loras(tmp_path_factory.mktemp("lora-fuse"), seed=21)


def _fused_image(path, weight: float, seed: int) -> np.ndarray:
    """Python's fuse_lora() of one adapter at `weight`: a 64x64 "a cat", 2 steps."""
    pipe = _pipe("base")
    pipe.load_lora_weights(path, adapter_name="a")
    pipe.set_adapters("a", adapter_weights=weight)
    pipe.fuse_lora()
    return pipe(prompt="a cat", num_inference_steps=2, height=64, width=64, seed=seed, output_type="np").images[0]


def _variants(model) -> list[str]:
    return [str(k[0]) for k in model._compiled if "+lora-" in str(k[0])]


def test_fuse_lora_equals_diffusers(files):
    """Two adapters (0.8, 0.5) fused with lora_scale 0.7 into the UNet and both text encoders: equal to diffusers'
    fuse_lora(lora_scale=0.7); the fused models have no LoRA inputs. A switch while fused fuses the new set; each
    fused image equals the branches' image of the same set, and unfuse_lora() gives the branches back."""
    paths, ref = files
    pipe = _pipe("base")
    for name, path in paths.items():
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.8, 0.5])
    pipe.fuse_lora(lora_scale=0.7)
    fused = _ours(pipe)
    ref.set_adapters(["peft", "kohya"], adapter_weights=[0.8, 0.5])
    ref.fuse_lora(lora_scale=0.7)
    try:
        parity.assert_parity(fused, _diffusers(ref))
    finally:
        ref.unfuse_lora()
    for model in pipe._lora_models().values():
        assert _variants(model) and all("+lora-fused-" in v for v in _variants(model))
        for key, compiled in model._compiled.items():
            assert not [p for p in compiled.inputs if p.get_any_name().startswith("lora_")], key
    assert [r["fused"] for r in pipe.lora_record()] == [True, True]

    pipe.unfuse_lora()
    assert "fused" not in pipe.lora_record()[0]
    pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.56, 0.35])  # 0.7 x (0.8, 0.5), as branches
    np.testing.assert_allclose(_ours(pipe)[0], fused[0], atol=1e-4)
    for model in pipe._lora_models().values():  # the branches' variant compiled, the fused one dropped
        assert _variants(model) and all("fused" not in v for v in _variants(model))
    plain = _ours(_pipe("base"))
    assert np.abs(_ours(pipe)[0] - plain[0]).max() > 0.05  # the adapters change the picture

    pipe.set_adapters("peft", adapter_weights=0.9)
    branch = _ours(pipe)
    pipe.fuse_lora()
    one = _ours(pipe)  # the set in force, fused
    np.testing.assert_allclose(one[0], branch[0], atol=1e-4)
    assert np.abs(one[0] - fused[0]).max() > 0.05
    pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.56, 0.35])  # fused again: a compile, the same image
    np.testing.assert_allclose(_ours(pipe)[0], fused[0], atol=1e-4)
    pipe.disable_lora()  # none in force: the plain weights, still one compiled copy of them
    np.testing.assert_allclose(_ours(pipe)[0], plain[0], atol=1e-5)
    assert all(len(_variants(m)) == 1 for m in pipe._lora_models().values())
    pipe.unload_lora_weights()  # forgets the fusion too
    assert pipe.unet.lora is None


def test_fuse_lora_bad_calls_change_nothing(files):
    paths, _ = files
    pipe = _pipe("base")
    with pytest.raises(RuntimeInputError, match=r"^fuse_lora: no adapter is loaded"):
        pipe.fuse_lora()
    pipe.load_lora_weights(paths["peft"], adapter_name="peft")
    for kwargs, message in [({"lora_scale": "x"}, "lora_scale 'x' is not a finite number"),
                            ({"lora_scale": float("nan")}, "lora_scale nan is not a finite number"),
                            ({"components": ["vae"]}, "component 'vae' is not one of this pipeline's")]:  # fmt: skip
        with pytest.raises(RuntimeInputError, match=message):
            pipe.fuse_lora(**kwargs)
    assert all(m.lora.fused is None for m in pipe._lora_models().values())
    pipe.fuse_lora(components=["unet"])  # the UNet only: the text encoders keep their branches
    assert pipe.unet.lora.fused == 1.0 and all(e.encoder.lora.fused is None for e in pipe.text_encoders)


def test_cli_fuse_lora(files, tmp_path):
    """--fuse-lora: the image of Python's fuse_lora(), recorded in the PNG so that --from-png fuses again."""
    from PIL import Image

    from runtime.flags import png_flags
    from runtime.image import read_png_parameters

    paths, _ = files
    out = tmp_path / "fused.png"
    args = ["--model", ov_dir("base"), "--prompt", "a cat", "--steps", "2", "--height", "64", "--width", "64",
            "--precision", "f32", "--seed", "3", "--cache-dir", "", "--lora", f"{paths['peft']}:0.8"]  # fmt: skip
    proc = cli.run("runtime.generate", *args, "--fuse-lora", "--output", out)
    assert proc.returncode == 0, proc.stderr
    params = read_png_parameters(out)
    assert params["loras"][0]["fused"] is True and "--fuse-lora" in png_flags(params)
    want = _fused_image(paths["peft"], 0.8, seed=3)
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), want)
    proc = cli.run("runtime.generate", *args[:-2], "--fuse-lora", "--output", tmp_path / "x.png")
    cli.assert_one_line_error(proc, "--fuse-lora needs --lora")
    assert not (tmp_path / "x.png").exists()


def test_benchmark_compare_runs(files):
    """benchmarks.lora_runtime --compare (never timed here): the branches, fuse_lora and the plain model kept
    compiled and alternated, each one's ratio to the last printed."""
    paths, _ = files
    args = ["--folder", ov_dir("base"), "--lora", paths["peft"], "--compare", "active,fuse_lora,plain", "--size", "64",
            "--steps", "2", "--rounds", "2", "--precision", "f32"]  # fmt: skip
    proc = cli.run("benchmarks.lora_runtime", *args)
    assert proc.returncode == 0, proc.stderr
    for name in ("active", "fuse_lora"):
        assert f"{name} / plain: ratio of medians" in proc.stdout, proc.stdout


def test_benchmark_compare_unet_calls(files):
    """--unet-calls alternates single UNet calls, NAME#2 builds a configuration again (an A/A control), disabled
    toggles active's pipeline; openvino.genai's configurations are refused there in one line."""
    paths, _ = files
    args = ["--folder", ov_dir("base"), "--lora", paths["peft"], "--size", "64", "--rounds", "3", "--precision",
            "f32", "--unet-calls"]  # fmt: skip
    proc = cli.run("benchmarks.lora_runtime", *args, "--compare", "active,active#2,disabled")
    assert proc.returncode == 0, proc.stderr
    assert "active#2 / disabled: ratio of medians" in proc.stdout, proc.stdout
    assert proc.stdout.count("first generation") == 2, proc.stdout  # disabled: active's pipeline, toggled
    assert sum(line.startswith("round ") for line in proc.stdout.splitlines()) == 3, proc.stdout
    proc = cli.run("benchmarks.lora_runtime", *args, "--compare", "active,genai-plain")
    assert proc.returncode != 0 and "--unet-calls: our pipelines only" in proc.stderr, proc.stderr


def test_benchmark_compare_processes(files):
    """--processes K: each configuration timed in processes of its own (K rounds, alternated)."""
    paths, _ = files
    args = ["--folder", ov_dir("base"), "--lora", paths["peft"], "--size", "64", "--rounds", "2", "--precision",
            "f32", "--compare", "disabled,plain", "--processes", "1"]  # fmt: skip
    proc = cli.run("benchmarks.lora_runtime", *args)
    assert proc.returncode == 0, proc.stderr
    assert sum(line.startswith("process round ") for line in proc.stdout.splitlines()) == 1, proc.stdout
    assert "disabled / plain: ratio of medians" in proc.stdout, proc.stdout


def test_fuse_lora_with_deepcache(files):
    """DeepCache's full and shallow UNets (derived models) are fused alike: the image of the branches."""
    paths, _ = files
    pipe = _pipe("base")
    pipe.load_lora_weights(paths["kohya"], adapter_name="kohya")
    kw = dict(prompt="a cat", num_inference_steps=4, height=64, width=64, seed=5, output_type="latent")
    branches = pipe(deepcache_interval=2, **kw).latents
    pipe.fuse_lora()
    fused = pipe(deepcache_interval=2, **kw).latents
    np.testing.assert_allclose(fused, branches, atol=1e-4)
    assert np.abs(fused - pipe(**kw).latents).max() > 1e-3  # DeepCache's skips change the latents


def test_batch_fuse_lora(files, tmp_path):
    """runtime.batch --lora F --fuse-lora: every line's image fused, as Python's fuse_lora() makes it; without
    --lora it is one line."""
    from PIL import Image

    from runtime.batch import main

    paths, _ = files
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n')
    args = ["--model", str(ov_dir("base")), "--prompts", str(prompts), "--steps", "2", "--height", "64", "--width",
            "64", "--precision", "f32", "--seed", "3", "--cache-dir", ""]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "out"), "--lora", f"{paths['peft']}:0.8", "--fuse-lora"]) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    want = _fused_image(paths["peft"], 0.8, seed=3)
    with Image.open(png) as im:
        assert np.array_equal(np.asarray(im), want)
    assert main([*args, "--out", str(tmp_path / "bad"), "--fuse-lora"]) == 2
