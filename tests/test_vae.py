"""The VAE (issue 15): the tiny autoencoder, tiled decode and encode, previews, against diffusers."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest
import torch
from PIL import Image

from runtime import vae
from runtime.errors import RuntimeInputError
from runtime.ov_model import OVModel
from runtime.params import ModelInfo
from tests import cli, models
from tests.cli import assert_one_line_error
from tests.parity import assert_parity, our_pipe

SMALL = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0)
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def base():
    """(diffusers folder, OpenVINO folder with the tiny autoencoder, the tiny autoencoder's diffusers folder)"""
    return models.source_dir("base"), models.ov_dir("base", tiny_vae=True), models.tiny_autoencoder_dir()


def _diffusers(src, seed, img2img=False, tiny=None, tile=None, inpaint=False, euler_a=False, **kwargs):
    """diffusers' SDXL pipeline (fp32; img2img, inpaint; euler_a: EulerAncestralDiscreteScheduler) with
    pipe.vae = AutoencoderTiny(tiny), or vae.enable_tiling() with tile_sample_min_size = tile
    (tile_latent_min_size = tile / 8; True: the config's) -> (latents, uint8 images)."""
    import diffusers

    cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
    cls = diffusers.StableDiffusionXLInpaintPipeline if inpaint else cls
    pipe = cls.from_pretrained(src, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if euler_a:
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    if tiny is not None:
        pipe.vae = diffusers.AutoencoderTiny.from_pretrained(tiny, dtype=torch.float32)
    if tile is not None:
        pipe.vae.enable_tiling()
        if tile is not True:
            pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = tile, tile // 8
    captured = {}

    def keep(p, i, t, cb_kwargs):
        captured["latents"] = cb_kwargs["latents"].detach().clone()
        return cb_kwargs

    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", callback_on_step_end=keep,
               **kwargs)  # fmt: skip
    return captured["latents"].numpy(), (out.images * 255).round().astype(np.uint8)


def _ours(ov_dir, seed, **kwargs):
    result = our_pipe(str(ov_dir))(seed=seed, output_type="np", **kwargs)
    return result.latents, result.images


def _image(width: int, height: int) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    rgb += np.random.default_rng(0).normal(0, 20, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


# -- the tiny autoencoder ------------------------------------------------------------------------------------------
def test_tiny_autoencoder_irs_match_torch(base):
    """vae_decoder_tiny / vae_encoder_tiny, as the runtime calls them, against AutoencoderTiny (non-square)."""
    from diffusers import AutoencoderTiny

    _, ov_dir, tiny_src = base
    torch_vae = AutoencoderTiny.from_pretrained(tiny_src).eval()
    tiny = vae.TinyVAE(ov.Core(), ov_dir, "CPU", F32)
    z = torch.randn(2, 4, 24, 32, generator=torch.Generator().manual_seed(0)) * 2
    x = torch.rand(1, 3, 200, 136, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref_dec, ref_enc = torch_vae.decode(z).sample.numpy(), torch_vae.encode(x).latents.numpy()
    assert np.abs(tiny.decode_float(z.numpy()) - ref_dec).max() <= 1e-4
    assert np.abs(tiny.encode(x.numpy()) - ref_enc).max() <= 1e-4
    for sub, names in (
        (vae.TINY_DECODER, (["latent_sample"], ["sample"])),
        (vae.TINY_ENCODER, (["sample"], ["latents"])),
    ):
        model = ov.Core().read_model(ov_dir / sub / "openvino_model.xml")
        assert ([p.get_any_name() for p in model.inputs], [p.get_any_name() for p in model.outputs]) == names
        assert json.loads((ov_dir / sub / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    info = json.loads((ov_dir / "convert_info.json").read_text())
    assert {vae.TINY_DECODER, vae.TINY_ENCODER} <= set(info["submodels"])


def test_tiny_decoder_text2img_parity(base):
    """vae_decoder="tiny" equals diffusers' SDXL pipeline with pipe.vae = AutoencoderTiny(...)."""
    src, ov_dir, tiny_src = base
    kwargs = dict(SMALL, height=192, width=256)
    assert_parity(_ours(ov_dir, 7, vae_decoder="tiny", **kwargs), _diffusers(src, 7, tiny=tiny_src, **kwargs))


def test_folder_without_tiny_vae_is_one_line_error(tiny, tmp_path):
    _, ov_dir = tiny("base")
    pipe = our_pipe(str(ov_dir))
    for kwargs in (dict(vae_decoder="tiny"), dict(preview="tiny")):
        with pytest.raises(RuntimeInputError, match="no tiny VAE"):
            pipe.generate(prompt="a cat", **kwargs)
    proc = cli.run("runtime.generate", "--model", ov_dir, "--prompt", "a cat", "--steps", "1", "--height", "64",
                   "--width", "64", "--vae-decoder", "tiny", "--output", tmp_path / "x.png")  # fmt: skip
    assert_one_line_error(proc, "--tiny-vae")
    assert not (tmp_path / "x.png").exists()


def test_tiny_vae_encodes_img2img_and_inpainting(base):
    """vae_decoder="tiny" encodes the image with the tiny encoder too, as diffusers' img2img and inpaint pipelines
    with pipe.vae = AutoencoderTiny(...) (its latents, no posterior draw); the full VAE's encode differs."""
    src, ov_dir, tiny_src = base
    kwargs = dict(SMALL, image=_image(64, 64), strength=0.75)  # 3 of 4 steps
    ours = _ours(ov_dir, 9, vae_decoder="tiny", **kwargs)
    assert_parity(ours, _diffusers(src, 9, img2img=True, tiny=tiny_src, **kwargs))
    assert not np.allclose(ours[0], _ours(ov_dir, 9, **kwargs)[0], atol=1e-2)  # the full VAE's encode
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 16:56] = 255
    kwargs = dict(kwargs, image=_image(64, 64), mask_image=Image.fromarray(mask), height=64, width=64)
    ours = _ours(ov_dir, 10, vae_decoder="tiny", scheduler="euler_a", **kwargs)  # step noise after the encodes
    assert_parity(ours, _diffusers(src, 10, inpaint=True, tiny=tiny_src, euler_a=True, **kwargs))


def test_tiny_vae_without_its_encoder_is_one_line_error(base, tmp_path):
    _, ov_dir, _ = base
    folder = tmp_path / "no-tiny-encoder"
    folder.mkdir()
    for item in ov_dir.iterdir():
        if item.name != vae.TINY_ENCODER:
            (folder / item.name).symlink_to(item)
    pipe = our_pipe(str(folder))
    assert pipe.generate(prompt="a cat", vae_decoder="tiny", height=64, width=64) is not None  # text2img: no encode
    image, mask = _image(64, 64), Image.new("L", (64, 64), 255)
    for kwargs in (dict(image=image), dict(image=image, mask_image=mask)):
        with pytest.raises(RuntimeInputError, match=r"no tiny VAE \(vae_encoder_tiny/\).*--tiny-vae"):
            pipe.generate(prompt="a cat", vae_decoder="tiny", **kwargs)
        assert pipe.generate(prompt="a cat", **kwargs) is not None  # the full VAE encodes


# -- tiled decode and encode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tile,size", [(None, (192, 256)), (64, (200, 264)), (96, (320, 224))])
def test_tiled_vae_matches_diffusers_components(base, tile, size):
    """tiled_decode / tiled_encode on the converted VAE against AutoencoderKL with enable_tiling(), border tiles
    of 1 to 3 sizes per side (200 x 264 with 64 px tiles: latent tiles of 8, 7 and 1)."""
    from diffusers import AutoencoderKL

    src, ov_dir, _ = base
    kl = AutoencoderKL.from_pretrained(src, subfolder="vae").eval()
    kl.enable_tiling()
    tiles = vae.Tiles.of(ModelInfo.load(ov_dir), tile)
    kl.tile_sample_min_size, kl.tile_latent_min_size = tiles.sample, tiles.latent
    core, (h, w) = ov.Core(), size
    dec = OVModel(core, ov_dir / "vae_decoder" / "openvino_model.xml", "CPU", F32)
    enc = OVModel(core, ov_dir / "vae_encoder" / "openvino_model.xml", "CPU", F32)
    z = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref_dec, ref_moments = kl.decode(z).sample.numpy(), kl.encode(x).latent_dist.parameters.numpy()
    ours = vae.tiled_decode(lambda t: dec({"latent_sample": t})["sample"], z.numpy(), tiles)
    assert ours.shape == ref_dec.shape and np.abs(ours - ref_dec).max() <= 1e-4
    moments = vae.tiled_encode(lambda t: enc({"sample": t})["latent_parameters"], x.numpy(), tiles)
    assert moments.shape == ref_moments.shape and np.abs(moments - ref_moments).max() <= 1e-4


@pytest.mark.parametrize("tile,size", [(None, (192, 256)), (64, (200, 264))])
def test_tiled_decode_text2img_parity(base, tile, size):
    """vae_tiling="on" equals diffusers with vae.enable_tiling() (the config's 128 px tiles, or 64 px)."""
    src, ov_dir, _ = base
    kwargs = dict(SMALL, height=size[0], width=size[1])
    ours = _ours(ov_dir, 3, vae_tiling="on", vae_tile_size=tile, **kwargs)
    assert_parity(ours, _diffusers(src, 3, tile=True if tile is None else tile, **kwargs))
    untiled = _ours(ov_dir, 3, vae_tiling="off", **kwargs)
    assert np.array_equal(ours[0], untiled[0]) and not np.array_equal(ours[1], untiled[1])  # the tiles show


def test_tiled_encode_img2img_parity(base):
    """img2img with vae_tiling="on": the posterior's moments from tiles, as diffusers' tiled encode."""
    src, ov_dir, _ = base
    kwargs = dict(SMALL, image=_image(264, 200), strength=0.6)
    ours = _ours(ov_dir, 5, vae_tiling="on", vae_tile_size=64, **kwargs)
    assert_parity(ours, _diffusers(src, 5, img2img=True, tile=64, **kwargs))


def test_tiling_below_the_tile_size_is_untiled(base):
    """diffusers tiles only above the tile size: "on" at 128x96 (tile 128 px) is the untiled decode, bit for bit."""
    _, ov_dir, _ = base
    kwargs = dict(SMALL, height=128, width=96, num_inference_steps=2)
    tiled, untiled = _ours(ov_dir, 1, vae_tiling="on", **kwargs), _ours(ov_dir, 1, vae_tiling="off", **kwargs)
    assert np.array_equal(tiled[1], untiled[1])


def test_auto_tiling_follows_the_memory(base):
    _, ov_dir, _ = base
    info = ModelInfo.load(ov_dir)
    need = vae.decode_bytes(info, 1024, 1024)
    assert vae.choose_tiles(info, 1024, 1024, "auto", available=10 * need) is None
    assert vae.choose_tiles(info, 1024, 1024, "auto", available=need) == vae.Tiles(128, 16)  # the config's tile
    assert vae.choose_tiles(info, 1024, 1024, "auto", 64, available=need) == vae.Tiles(64, 8)
    assert vae.choose_tiles(info, 64, 64, "on") == vae.Tiles(128, 16)
    assert vae.choose_tiles(info, 4096, 4096, "off", available=1) is None


def test_memory_check_counts_the_decode_that_runs(base):
    """A size refused with the untiled decode under a limit fits tiled ("on", and "auto", which tiles under that
    limit at decode time too); the refusal names the VAE stage."""
    from runtime.pipeline import SDXLPipeline

    _, ov_dir, _ = base
    info = ModelInfo.load(ov_dir)
    untiled, tiled = info.memory_estimate(512, 512), info.memory_estimate(512, 512, tiles=vae.Tiles.of(info))
    limit = 20 * 2**20
    assert sum(tiled.values()) < limit < sum(untiled.values()) and tiled["vae_decoder"] < untiled["vae_decoder"]
    pipe = SDXLPipeline(ov_dir, cache_dir=None, precision="f32", max_memory_gb=limit / 2**30)
    common = dict(prompt="a cat", height=512, width=512, num_inference_steps=1, seed=0)
    with pytest.raises(RuntimeInputError, match=r"512x512 .*\(vae_decoder: 24\.0 MiB\).*--vae-tiling on"):
        pipe.generate(vae_tiling="off", **common)
    assert pipe.generate(vae_tiling="on", **common) is not None
    result = pipe(vae_tiling="auto", **common)
    assert result.parameters["vae_tiling"] == "on" and result.images.shape == (1, 512, 512, 3)
    with pytest.raises(RuntimeInputError, match="vae_decoder"):  # the same under a limit the tiles exceed too
        SDXLPipeline(ov_dir, cache_dir=None, max_memory_gb=10 / 1024).generate(vae_tiling="auto", **common)


def test_memory_estimate_of_the_tiny_and_tiled_decoders(base, tmp_path):
    """SDXL's VAE (real config): 256 x H x W values untiled, the same on a 512 px tile plus the tiles' RGB outputs;
    TAESDXL (AutoencoderTiny's defaults, no config here): 64 x H x W; the test folder's tiny decoder: 16 x H x W."""
    import dataclasses

    from runtime import memory

    _, ov_dir, _ = base
    info = ModelInfo.load(ov_dir)
    assert memory.vae_bytes(info, 1024, 768, "tiny") == 3 * 16 * 1024 * 768 * 4
    sdxl = dataclasses.replace(info, dir=tmp_path, vae_config={"block_out_channels": [128, 256, 512, 512]})
    px = 1024 * 1024
    assert memory.vae_bytes(sdxl, 1024, 1024) == 3 * 256 * px * 4
    assert memory.vae_bytes(sdxl, 1024, 1024, tiles=vae.Tiles(512, 64)) == 3 * 256 * px // 4 * 4 + 3 * 4 * (
        9 * px // 4 + px
    )  # 3x3 tiles (steps of 48 latents)
    tiny = sdxl.memory_estimate(1024, 1024, vae_decoder="tiny")
    assert tiny["vae_decoder"] == 3 * 64 * px * 4
    full = sum(sdxl.memory_estimate(1024, 1024).values())
    limit = (sum(tiny.values()) + full) / 2
    with pytest.raises(RuntimeInputError, match="vae_decoder"):
        memory.check(sdxl, 1024, 1024, limit=limit)
    memory.check(sdxl, 1024, 1024, limit=limit, vae_decoder="tiny")
    with pytest.raises(RuntimeInputError, match=r"vae_decoder \(tiny\)"):
        memory.check(sdxl, 1024, 1024, limit=sum(tiny.values()) - 1, vae_decoder="tiny")


# -- previews ------------------------------------------------------------------------------------------------------
def test_approx_preview_is_the_published_projection():
    latents = np.random.default_rng(0).standard_normal((2, 4, 3, 5)).astype(np.float32)
    rgb = vae.approx_rgb(latents)
    assert rgb.shape == (2, 3, 5, 3) and rgb.dtype == np.uint8
    x = latents[1, :, 2, 4] @ vae.SDXL_LATENT_RGB + vae.SDXL_LATENT_RGB_BIAS  # one pixel, in [-1, 1]
    assert np.abs(rgb[1, 2, 4].astype(int) - np.round(np.clip(x / 2 + 0.5, 0, 1) * 255)).max() <= 1


def test_previews_on_the_steps_asked(base):
    _, ov_dir, _ = base
    pipe = our_pipe(str(ov_dir))
    common = dict(SMALL, height=128, width=192, seed=2, num_inference_steps=5)
    for kind in ("approx", "tiny"):
        gen = pipe.generate(preview=kind, preview_every=2, **common)
        shown = []
        for state in gen:
            image = gen.preview(state)
            if image is None:
                continue
            shown.append(state.index)
            want = vae.approx_rgb(state.denoised) if kind == "approx" else pipe.tiny_vae.decode(state.denoised)
            assert np.array_equal(image, want)
            assert image.shape == ((1, 16, 24, 3) if kind == "approx" else (1, 128, 192, 3))
        assert shown == [1, 3]
        assert np.array_equal(gen.result().images, pipe(**common).images)  # previews change nothing
    gen = pipe.generate(**common)  # previews off (the default): nothing made
    assert all(gen.preview(state) is None for state in gen)


def test_cli_tiny_decoder_previews_and_tiling(base, tmp_path):
    _, ov_dir, _ = base
    out = tmp_path / "img.png"
    args = ["--model", ov_dir, "--prompt", "a cat", "--steps", "3", "--height", "192", "--width", "256", "--seed", "4",
            "--precision", "f32", "--cache-dir", ""]  # fmt: skip
    proc = cli.run("runtime.generate", *args, "--vae-decoder", "tiny", "--preview", "approx", "--preview-every", "1",
                   "--output", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    previews = sorted(tmp_path.glob("img-preview*.png"))
    assert len(previews) == 3 and Image.open(previews[0]).size == (32, 24)
    want = our_pipe(str(ov_dir))(prompt="a cat", num_inference_steps=3, height=192, width=256, seed=4,
                                 vae_decoder="tiny").images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), want)
    proc = cli.run("runtime.generate", *args, "--vae-tiling", "on", "--vae-tile-size", "64", "--output",
                   tmp_path / "tiled.png")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for bad, needle in ((["--vae-tile-size", "100"], "--vae-tile-size"), (["--preview-every", "0"], "--preview-every")):
        proc = cli.run("runtime.generate", *args, *bad, "--output", tmp_path / "bad.png")
        assert_one_line_error(proc, needle)


# -- convert --tiny-vae ---------------------------------------------------------------------------------------------
def test_convert_tiny_vae_bad_input(tmp_path):
    src = models.source_dir("base")
    proc = cli.run("convert", src, tmp_path / "out", "--tiny-vae", tmp_path / "nowhere")
    assert_one_line_error(proc, "--tiny-vae")
    from convert.tiny import TINY_AUTOENCODER, build_tiny_autoencoder

    wide = build_tiny_autoencoder(tmp_path / "taesd16", config=dict(TINY_AUTOENCODER, latent_channels=16))
    proc = cli.run("convert", src, tmp_path / "out", "--tiny-vae", wide)
    assert_one_line_error(proc, "latent space")
    (tmp_path / "kl").mkdir()
    (tmp_path / "kl" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "kl" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    proc = cli.run("convert", src, tmp_path / "out", "--tiny-vae", tmp_path / "kl")
    assert_one_line_error(proc, "not a diffusers AutoencoderTiny")
    assert not (tmp_path / "out").exists()
