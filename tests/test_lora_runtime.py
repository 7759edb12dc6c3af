"""LoRA adapters at run time (runtime/lora.py): equal to diffusers' unfused adapters (load_lora_weights with
adapter_name + set_adapters) for the same seed; switching leaves nothing behind; bad files are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runtime.errors import RuntimeInputError
from runtime.lora_api import parse_lora_spec
from runtime.lora_files import load_lora
from runtime.pipeline import SDXLPipeline
from tests import cli, parity
from tests.models import ov_dir
from tests.test_lora import _fresh_pipe, _random_lora, _save_kohya, _save_peft

SMALL = dict(prompt="a photo of a cat", negative_prompt="blurry", height=64, width=96, num_inference_steps=2,
             guidance_scale=5.0)  # fmt: skip
ALL = ("unet", "text_encoder", "text_encoder_2")


def _diffusers(ref, seed=7):
    """diffusers' run on `ref` (a pipeline with adapters set) through tests.parity."""
    ref.original_scheduler = ref.scheduler
    saved = parity.diffusers_pipe
    parity.diffusers_pipe = lambda src, img2img=False: ref
    try:
        return parity.run_diffusers("unused", seed=seed, **SMALL)
    finally:
        parity.diffusers_pipe = saved


def _ours(pipe, seed=7):
    r = pipe(seed=seed, output_type="np", **SMALL)
    return r.latents, r.images


def _pipe(kind):
    return SDXLPipeline(ov_dir(kind), precision="f32", cache_dir=None)


def two_loras(d, seed: int):
    """Two LoRA files for the tiny SDXL (PEFT keys with metadata, all layers incl. 3x3 convs, UNet + both text
    encoders; kohya keys in SGM spelling with alphas) and diffusers' pipeline with both loaded, unfused."""
    ref = _fresh_pipe("base")
    files = {"peft": _save_peft(_random_lora(ref, ALL, seed=seed), d / "peft.safetensors"),
             "kohya": _save_kohya(_random_lora(ref, ALL, seed=seed + 1), d / "kohya.safetensors",
                                  ref.unet.config.layers_per_block)}  # fmt: skip
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    return files, ref


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return two_loras(tmp_path_factory.mktemp("lora-runtime"), seed=11)


@pytest.fixture(scope="module")
def ours():
    """Our tiny SDXL pipeline, shared by the tests below, and the images they made (by name)."""
    return _pipe("base"), {}


def test_switching_equals_diffusers_and_fresh_runs(base, ours):
    """Two adapters blended (0.8, 0.5) -> one (PEFT, UNet + text encoders) -> none -> two again, in one process:
    each equal to diffusers' unfused adapters and to a fresh pipeline's run."""
    files, ref = base
    pipe, made = ours
    made["plain"] = plain = _ours(pipe)
    for name, path in files.items():
        assert pipe.load_lora_weights(path, adapter_name=name) == name
    assert pipe.get_active_adapters() == ["kohya"]  # diffusers: the last loaded is the active one
    pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.8, 0.5])
    ref.enable_lora()
    ref.set_adapters(["peft", "kohya"], adapter_weights=[0.8, 0.5])
    made["two"] = two = _ours(pipe)
    parity.assert_parity(two, _diffusers(ref))
    assert np.abs(two[0] - plain[0]).max() > 0.05  # the adapters change the picture

    pipe.set_adapters("peft")
    ref.set_adapters("peft")
    one = _ours(pipe)
    parity.assert_parity(one, _diffusers(ref))
    fresh = _pipe("base")
    fresh.load_lora_weights(files["peft"], adapter_name="peft")
    np.testing.assert_allclose(one[0], _ours(fresh)[0], atol=1e-5)

    pipe.disable_lora()
    assert pipe.get_active_adapters() == ["peft"] and pipe.lora_record() == []
    np.testing.assert_allclose(_ours(pipe)[0], plain[0], atol=1e-6)  # the plain model's output
    linear = [t for n, t in pipe.unet.lora.tensors.items() if n.startswith(("lora_a.", "lora_b.")) and t.ndim == 2]
    assert linear and all(0 in t.shape for t in linear)  # rank 0: the branches' MatMuls compute nothing
    pipe.enable_lora()
    np.testing.assert_allclose(_ours(pipe)[0], one[0], atol=1e-6)

    assert load_lora(files["peft"]) is pipe._lora()["loaded"]["peft"][0]  # loaded again: nothing read
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == [] and pipe.get_list_adapters() == {}
    assert pipe.unet.lora is None and all(enc.encoder.lora is None for enc in pipe.text_encoders)
    none = _ours(pipe)
    np.testing.assert_allclose(none[0], plain[0], atol=1e-6)
    for compiled in pipe.unet._compiled.values():  # the plain compiled model again, no LoRA inputs
        assert not [p for p in compiled.inputs if p.get_any_name().startswith("lora_")]
    for name, path in files.items():
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.8, 0.5])
    again = _ours(pipe)
    np.testing.assert_allclose(again[0], two[0], atol=1e-6)
    assert np.array_equal(again[1], two[1])


def _one_adapter_parity(kind, make, tmp_path):
    ref = _fresh_pipe(kind)
    path = make(ref, tmp_path)
    ref.load_lora_weights(str(path), adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[0.7])
    pipe = _pipe(kind)
    pipe.load_lora_weights(path, adapter_name="x")
    pipe.set_adapters("x", 0.7)
    parity.assert_parity(_ours(pipe), _diffusers(ref))


def test_ssd1b_adapter_parity(tmp_path):
    """SSD-1B's block layout: a PEFT LoRA on every UNet and text-encoder layer."""
    _one_adapter_parity("ssd-1b", lambda ref, d: _save_peft(_random_lora(ref, ALL, seed=5), d / "s.safetensors"),
                        tmp_path)  # fmt: skip


def test_vega_kohya_adapter_parity(tmp_path):
    """Vega's block layout: an LCM-LoRA-like UNet-only kohya file in diffusers spelling (LoCon conv layers)."""

    def make(ref, d):
        lora = _random_lora(ref, ["unet"], seed=6)
        # diffusers' kohya loader drops add_embedding layers spelled the diffusers way (it strips their index)
        lora["unet"] = {k: v for k, v in lora["unet"].items() if not k.startswith("add_embedding")}
        return _save_kohya(lora, d / "vega.safetensors")

    _one_adapter_parity("vega", make, tmp_path)


def _bad_files(d):
    from safetensors.torch import save_file

    def pair(key, down, up, kohya=True):
        if kohya:
            return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0)}
        return {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}

    good = pair("unet.down_blocks.1.attentions.0.proj_in", torch.ones(2, 32), torch.ones(32, 2), kohya=False)
    files = {
        # SD 1.5's UNet has attentions in its first down block, SDXL's none
        "sd15": pair("lora_unet_down_blocks_0_attentions_0_proj_in", torch.ones(4, 320), torch.ones(320, 4)),
        "sd3": pair("transformer.transformer_blocks.0.attn.to_q", torch.ones(4, 64), torch.ones(64, 4), False),
        "rank": {
            **good,
            **pair("unet.down_blocks.1.attentions.0.proj_out", torch.ones(4, 32), torch.ones(32, 2), kohya=False),
        },  # fmt: skip
        "shape": {**good, **pair("unet.conv_in", torch.ones(2, 4, 1, 1), torch.ones(16, 2, 1, 1), kohya=False)},
        "loha": {"lora_unet_conv_in.hada_w1_a": torch.ones(16, 2)},
    }
    paths = {}
    for name, sd in files.items():
        paths[name] = d / f"{name}.safetensors"
        save_file(sd, paths[name])
    data = paths["shape"].read_bytes()
    paths["truncated"] = d / "truncated.safetensors"
    paths["truncated"].write_bytes(data[: len(data) - 40])
    return paths


BAD = {
    "sd15": "layer 'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight' matches no layer of the UNet",
    "sd3": "key 'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' is not an SDXL LoRA key",
    "rank": "layer 'unet.down_blocks.1.attentions.0.proj_out.lora_A.weight' is not a LoRA pair (down [4, 32], up "
    "[32, 2]",
    "shape": "layer 'unet.conv_in.lora_A.weight' does not fit the UNet's conv_in (weight [16, 4, 3, 3]; down "
    "[2, 4, 1, 1], up [16, 2, 1, 1])",
    "loha": "key 'lora_unet_conv_in.hada_w1_a' is not a LoRA down/up weight or alpha",
    "truncated": "not a readable .safetensors LoRA",
}


def test_bad_files_change_nothing(base, ours, tmp_path):
    """One line naming the file and the first offending layer; the adapters in force are unchanged."""
    files, _ = base
    paths = _bad_files(tmp_path)
    pipe, made = ours
    pipe.unload_lora_weights()
    pipe.load_lora_weights(files["peft"], adapter_name="peft")
    before = _ours(pipe)
    for name, message in BAD.items():
        with pytest.raises(RuntimeInputError) as e:
            pipe.load_lora_weights(paths[name], adapter_name=name)
        text = str(e.value)
        assert text.startswith(f"{paths[name]}: ") and message in text and "\n" not in text, (name, text)
    assert pipe.get_active_adapters() == ["peft"] and list(pipe.get_list_adapters()["unet"]) == ["peft"]
    np.testing.assert_allclose(_ours(pipe)[0], before[0], atol=1e-6)
    with pytest.raises(RuntimeInputError, match="already in use"):
        pipe.load_lora_weights(files["kohya"], adapter_name="peft")
    with pytest.raises(RuntimeInputError, match="'nope' is not loaded"):
        pipe.set_adapters(["nope"])
    with pytest.raises(RuntimeInputError, match="not a finite number"):
        pipe.set_adapters(["peft"], adapter_weights=[float("nan")])
    assert parse_lora_spec(f"{files['peft']}:0.8") == (files["peft"], 0.8)
    assert parse_lora_spec(str(files["peft"])) == (files["peft"], 1.0)
    with pytest.raises(RuntimeInputError, match="weight 'abc' is not a number"):
        parse_lora_spec(f"{files['peft']}:abc")
    with pytest.raises(RuntimeInputError, match="nope.safetensors: no such LoRA file"):
        pipe.load_lora_weights(tmp_path / "nope.safetensors")
    # a file loaded after a generation (its layers grafted by one more compile) blends as if loaded first
    pipe.load_lora_weights(files["kohya"], adapter_name="kohya")
    pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.8, 0.5])
    if "two" in made:
        np.testing.assert_allclose(_ours(pipe)[0], made["two"][0], atol=1e-5)
    refiner = SDXLPipeline(ov_dir("refiner"), precision="f32", cache_dir=None)
    with pytest.raises(RuntimeInputError, match="is for text_encoder, which this pipeline does not have"):
        refiner.load_lora_weights(files["kohya"])


def test_cli_loras_and_png_metadata(base, ours, tmp_path):
    """--lora FILE:WEIGHT (repeated): the image of the Python API's set_adapters, the adapters in the PNG (A1111's
    <lora:NAME:WEIGHT> in the prompt and Lora hashes); a bad file: exit 2, one line."""
    from PIL import Image

    files, _ = base
    out = tmp_path / "out.png"
    args = [
        "--prompt",
        SMALL["prompt"],
        "--negative-prompt",
        SMALL["negative_prompt"],
        "--height",
        "64",
        "--width",
        "96",
        "--steps",
        "2",
        "--guidance-scale",
        "5",
        "--seed",
        "7",
        "--precision",
        "f32",
        "--cache-dir",
        "",
    ]
    proc = cli.run("runtime.generate", "--model", ov_dir("base"), *args, "--lora", f"{files['peft']}:0.8", "--lora",
                   f"{files['kohya']}:0.5", "--output", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pipe, made = ours
    pipe.unload_lora_weights()
    for name, path in files.items():
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(["peft", "kohya"], [0.8, 0.5])
    with Image.open(out) as im:
        pixels, text = np.asarray(im), dict(im.text)
    assert np.array_equal(pixels, (made.get("two") or _ours(pipe))[1][0])
    assert text["parameters"].splitlines()[0] == f"{SMALL['prompt']} <lora:peft:0.8> <lora:kohya:0.5>"
    hashes = {r["name"]: r["hash"] for r in pipe.lora_record()}
    assert f'Lora hashes: "peft: {hashes["peft"]}, kohya: {hashes["kohya"]}"' in text["parameters"]
    assert [(r["name"], r["weight"]) for r in json.loads(text["sdxl-openvino"])["loras"]] == [
        ("peft", 0.8),
        ("kohya", 0.5),
    ]
    bad = _bad_files(tmp_path)["sd15"]
    proc = cli.run(
        "runtime.generate", "--model", ov_dir("base"), *args, "--lora", bad, "--output", tmp_path / "bad.png"
    )
    cli.assert_one_line_error(proc, f"{bad}: layer 'lora_unet_down_blocks_0_attentions_0_proj_in")
    assert not (tmp_path / "bad.png").exists()


def test_adapters_are_fed_in_the_models_precision(base, tmp_path):
    """A and B are fed in the type the model computes in, so the graph converts nothing per call: bf16 (converted
    once per file and kept), float16 (a float16 file's tensors as loaded: no copy), float32. Each adapter's scale
    is a third input, so a switch of weights copies no weight. The bf16 image is as far from the f32 run's as bf16
    puts the plain image from f32's. A file float16 cannot hold is one line on a float16 model, loads nothing."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from runtime.lora import as_bf16

    with safe_open(str(base[0]["peft"]), "np") as f:
        half, meta = {k: f.get_tensor(k).astype(np.float16) for k in f.keys()}, f.metadata()
    path = tmp_path / "half.safetensors"
    save_file(half, str(path), metadata=meta)
    assert {layer.down.dtype for layer in load_lora(path).layers} == {np.dtype(np.float16)}
    got, pipes, fed = {}, {}, {"bf16": np.uint16, "f16": np.float16, "f32": np.float32}
    for precision in ("bf16", "f16", "f32"):
        pipe = pipes[precision] = SDXLPipeline(ov_dir("base"), precision=precision, cache_dir=None)
        got[precision, "plain"] = _ours(pipe)[0]
        pipe.load_lora_weights(path, adapter_name="half")
        pipe.set_adapters(["half"], adapter_weights=[0.8])
        got[precision, "lora"] = _ours(pipe)[0]
        unet = pipe.unet.lora
        assert {v.dtype for k, v in unet.tensors.items() if not k.startswith("lora_s.")} == {np.dtype(fed[precision])}
        plan = pipe._lora()["loaded"]["half"][1]["unet"]
        module, layer = next(iter(plan.items()))
        n = unet.grafted.index(module)
        a, b = unet.tensors[f"lora_a.{n}"], unet.tensors[f"lora_b.{n}"]
        if precision == "f16":
            assert a is layer.down and b is layer.up  # as loaded
        if precision == "bf16":  # bf16's bits, rounded as OpenVINO rounds; the same arrays at the next switch
            np.testing.assert_array_equal(a, as_bf16(layer.down))
        np.testing.assert_allclose(unet.tensors[f"lora_s.{n}"], layer.scaling * 0.8, rtol=1e-6)
        before = dict(unet.tensors)
        pipe.set_adapters(["half"], adapter_weights=[0.5])  # a switch of weights: new scales, the same A and B
        assert all(unet.tensors[k] is v for k, v in before.items() if not k.startswith("lora_s."))
        np.testing.assert_allclose(unet.tensors[f"lora_s.{n}"], layer.scaling * 0.5, rtol=1e-6)
        pipe.set_adapters(["half"], adapter_weights=[0.8])
        assert np.isfinite(got[precision, "lora"]).all()

    pipe = pipes["f16"]
    big = {k: v.astype(np.float32) * (1e8 if "lora_B" in k else 1) for k, v in half.items()}
    save_file(big, str(tmp_path / "big.safetensors"), metadata=meta)  # float32, fine there; not in float16
    with pytest.raises(RuntimeInputError, match=rf"^{tmp_path / 'big.safetensors'}: layer .* exceeds float16's"):
        pipe.load_lora_weights(tmp_path / "big.safetensors", adapter_name="big")
    assert pipe.get_active_adapters() == ["half"] and "big" not in pipe.get_list_adapters()["unet"]
    np.testing.assert_array_equal(_ours(pipe)[0], got["f16", "lora"])  # weight 0.8 still in force
    pipes["bf16"].load_lora_weights(tmp_path / "big.safetensors", adapter_name="big")  # bf16 holds it
    bf16_noise = np.abs(got["bf16", "plain"] - got["f32", "plain"]).max()
    apart = np.abs(got["bf16", "lora"] - got["f32", "lora"]).max()
    effect = np.abs(got["f32", "lora"] - got["f32", "plain"]).max()
    assert apart <= 1.5 * bf16_noise and effect > 5 * apart, (apart, bf16_noise, effect)
