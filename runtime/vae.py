"""The VAE's ways between latents and pixels: full, tiny (TAESD/TAESDXL), tiled, and per-step previews.

- full: the folder's AutoencoderKL decoder/encoder (vae_decoder/, vae_encoder/), called by runtime.pipeline.
- tiled: the full VAE on overlapping tiles blended linearly, exactly as diffusers' AutoencoderKL.enable_tiling()
  (tile = the VAE config's sample_size unless set, overlap 0.25). A tile of each distinct size is one static shape,
  compiled when its tiles run: the border tiles are diffusers' smaller ones, not padded (GroupNorm and the
  mid-block attention see the whole tile, so padding would change the numbers). The tiles run grouped by shape
  and each shape's compiled model is released after its group, so one tile's memory is held at a time.
- tiny: a diffusers AutoencoderTiny converted with `python -m convert ... --tiny-vae` (vae_decoder_tiny/,
  vae_encoder_tiny/): as diffusers' SDXL pipelines with `pipe.vae = AutoencoderTiny(...)`, it both decodes the
  final image and encodes img2img's and inpainting's image (never tiled: vae_tiling is for the full VAE).
- previews of a step's predicted x0: "approx" (a fixed latent -> RGB projection, no model) or "tiny".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov

from runtime.errors import RuntimeInputError
from runtime.image import to_uint8
from runtime.memory import available_memory
from runtime.ov_model import OVModel
from runtime.params import ModelInfo, read_json

DECODERS = ("full", "tiny")
PREVIEWS = ("none", "approx", "tiny")
TILINGS = ("auto", "on", "off")
TINY_DECODER, TINY_ENCODER = "vae_decoder_tiny", "vae_encoder_tiny"  # the folders convert --tiny-vae writes
OVERLAP = 0.25  # diffusers AutoencoderKL.tile_overlap_factor
TILE_MULTIPLE = 32  # tile starts step by 0.75 x tile: a multiple of 32 px keeps them on the 8 px latent grid
MIN_TILE = 64
AUTO_MIN_TILE = 256  # auto tiling halves the tile down to this while a tile would not fit
AUTO_HEADROOM = 1.5  # the activation estimate is a floor: auto tiles when 1.5x it exceeds the memory available

# SDXL latents (as the UNet sees them, scaled by 0.13025) -> RGB in [-1, 1]: rgb = latents . FACTORS + BIAS per
# latent pixel. The numbers are ComfyUI's SDXL `latent_rgb_factors` and `latent_rgb_factors_bias`
# (comfyanonymous/ComfyUI, comfy/latent_formats.py, class SDXL); A1111's `cheap_approximation` for SDXL
# (AUTOMATIC1111/stable-diffusion-webui, modules/sd_vae_approx.py) is a similar fit without the bias.
SDXL_LATENT_RGB = np.array(
    [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
    dtype=np.float32,
)  # [4 latent channels, 3 colours]
SDXL_LATENT_RGB_BIAS = np.array([0.1084, -0.0175, -0.0011], dtype=np.float32)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_options(vae_decoder="full", preview="none", preview_every=1, vae_tiling="auto", vae_tile_size=None) -> None:
    """The VAE parameters of one generation (their diffusers-style names): one RuntimeInputError line each."""
    if vae_decoder not in DECODERS:
        raise RuntimeInputError(f"vae_decoder={vae_decoder!r}: choose one of {', '.join(DECODERS)}")
    if preview not in PREVIEWS:
        raise RuntimeInputError(f"preview={preview!r}: choose one of {', '.join(PREVIEWS)}")
    if not _is_int(preview_every) or preview_every < 1:
        raise RuntimeInputError(f"preview_every={preview_every!r} must be an integer of at least 1")
    if vae_tiling not in TILINGS:
        raise RuntimeInputError(f"vae_tiling={vae_tiling!r}: choose one of {', '.join(TILINGS)}")
    if vae_tile_size is not None and (
        not _is_int(vae_tile_size) or vae_tile_size < MIN_TILE or vae_tile_size % TILE_MULTIPLE
    ):
        raise RuntimeInputError(
            f"vae_tile_size={vae_tile_size!r} must be a multiple of {TILE_MULTIPLE} pixels, at least {MIN_TILE}"
        )


# -- previews ---------------------------------------------------------------------------------------------------
def approx_rgb(latents: np.ndarray) -> np.ndarray:
    """[N, 4, h, w] SDXL latents -> [N, h, w, 3] uint8 at the latent size, by the fixed projection above."""
    x = np.einsum("nchw,cr->nrhw", np.asarray(latents, np.float32), SDXL_LATENT_RGB)
    return to_uint8(x + SDXL_LATENT_RGB_BIAS[None, :, None, None])  # [N, 3, h, w] in [-1, 1] -> uint8


@dataclass(frozen=True)
class Previewer:
    """What a generation's `preview(state)` makes: every `every`-th step's predicted x0 (the latents where the
    sampler has none) as [N, H, W, 3] uint8, "approx" at the latent size, "tiny" at the image size; None when
    previews are off or the step is not one of them. Nothing runs until it is called."""

    kind: str = "none"
    every: int = 1
    tiny: TinyVAE | None = None

    def due(self, index: int) -> bool:
        return self.kind != "none" and (index + 1) % self.every == 0

    def __call__(self, state) -> np.ndarray | None:
        if not self.due(state.index):
            return None
        x = state.denoised if state.denoised is not None else state.latents
        if self.kind == "approx":
            return approx_rgb(x)
        return self.tiny.decode(x)


# -- the tiny autoencoder -------------------------------------------------------------------------------------------
class TinyVAE:
    """A folder's converted AutoencoderTiny: compiled on first use; a folder without one gives one error line then.
    # ref: diffusers StableDiffusionXLPipeline (decode: latents / scaling_factor), AutoencoderTiny.encode/decode"""

    def __init__(self, core: ov.Core, model_dir: str | Path, device: str = "CPU", config: dict | None = None):
        self.core, self.dir, self.device, self.config = core, Path(model_dir), device, dict(config or {})
        self._decoder: OVModel | None = None
        self._encoder: OVModel | None = None
        self._scaling: np.float32 | None = None

    @property
    def available(self) -> bool:
        return (self.dir / TINY_DECODER / "openvino_model.xml").is_file()

    def require(self, encoder: bool = False) -> None:
        """One RuntimeInputError line now, before any work, when the folder has no tiny decoder (or, encoder=True:
        no tiny encoder, which img2img and inpainting with vae_decoder="tiny" encode with)."""
        if not self.available:
            raise self._missing(TINY_DECODER)
        if encoder and not (self.dir / TINY_ENCODER / "openvino_model.xml").is_file():
            raise self._missing(TINY_ENCODER)

    def _missing(self, sub: str) -> RuntimeInputError:
        return RuntimeInputError(
            f"{self.dir}: no tiny VAE ({sub}/); convert with --tiny-vae (e.g. madebyollin/taesdxl) to add one"
        )

    @property
    def scaling_factor(self) -> np.float32:
        if self._scaling is None:
            path = self.dir / TINY_DECODER / "config.json"
            if not path.is_file():
                raise self._missing(TINY_DECODER)
            value = read_json(path).get("scaling_factor", 1.0)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise RuntimeInputError(f"{path}: scaling_factor={value!r} must be a finite positive number")
            self._scaling = np.float32(value)
        return self._scaling

    @property
    def decoder(self) -> OVModel:
        if self._decoder is None:
            if not self.available:
                raise self._missing(TINY_DECODER)
            self._decoder = OVModel(self.core, self.dir / TINY_DECODER / "openvino_model.xml", self.device,
                                    self.config, inputs=("latent_sample",), outputs=("sample",))  # fmt: skip
        return self._decoder

    @property
    def encoder(self) -> OVModel:
        if self._encoder is None:
            xml = self.dir / TINY_ENCODER / "openvino_model.xml"
            if not xml.is_file():
                raise self._missing(TINY_ENCODER)
            self._encoder = OVModel(self.core, xml, self.device, self.config, inputs=("sample",),
                                    outputs=("latents",))  # fmt: skip
        return self._encoder

    def decode_float(self, latents: np.ndarray) -> np.ndarray:
        """[N, 4, h, w] latents (as the UNet sees them) -> [N, 3, H, W] in [-1, 1], one image per call."""
        scaled = np.asarray(latents, np.float32) / self.scaling_factor
        out = np.concatenate([self.decoder({"latent_sample": scaled[i : i + 1]})["sample"] for i in range(len(scaled))])
        if not np.isfinite(out).all():
            raise RuntimeInputError(f"{self.decoder.xml}: the tiny VAE decoder produced NaN/inf")
        return out

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """[N, 4, h, w] latents -> [N, H, W, 3] uint8."""
        return to_uint8(self.decode_float(latents))

    def encode(self, image: np.ndarray) -> np.ndarray:
        """[B, 3, H, W] in [-1, 1] -> latents x scaling_factor (deterministic: AutoencoderTiny has no posterior)."""
        latents = self.encoder({"sample": image})["latents"]
        return (latents * self.scaling_factor).astype(np.float32)

    def trim(self) -> None:
        for model in (self._decoder, self._encoder):
            if model is not None:
                model.trim()

    def release(self) -> None:
        for model in (self._decoder, self._encoder):
            if model is not None:
                model.release()


# -- tiling -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    """diffusers' tile sizes: tile_sample_min_size (pixels) and tile_latent_min_size (latents)."""

    sample: int
    latent: int

    @classmethod
    def of(cls, info: ModelInfo, tile_size: int | None = None) -> Tiles:
        """tile_size pixels, else the VAE config's sample_size (diffusers' default: 1024 for SDXL's VAE)."""
        size = tile_size if tile_size is not None else info.vae_config.get("sample_size", 512)
        if isinstance(size, (list, tuple)):
            size = size[0]
        if not _is_int(size) or size <= 0:
            raise RuntimeInputError(f"{info.dir}/vae_decoder/config.json: sample_size={size!r} is not a tile size")
        return cls(int(size), int(size) // info.vae_scale_factor)

    def tiles_decode(self, latents_shape) -> bool:
        """# ref: diffusers AutoencoderKL._decode: tiled when a latent side exceeds tile_latent_min_size"""
        return latents_shape[-1] > self.latent or latents_shape[-2] > self.latent

    def tiles_encode(self, image_shape) -> bool:
        """# ref: diffusers AutoencoderKL._encode: tiled when an image side exceeds tile_sample_min_size"""
        return image_shape[-1] > self.sample or image_shape[-2] > self.sample


def _blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    """b's top rows fade in over a's bottom rows, in place. # ref: diffusers AutoencoderKL.blend_v"""
    e = min(a.shape[2], b.shape[2], extent)
    if e > 0:
        y = np.arange(e, dtype=np.float64) / e
        b[:, :, :e, :] = (
            a[:, :, -e:, :] * (1 - y).astype(np.float32)[:, None] + b[:, :, :e, :] * y.astype(np.float32)[:, None]
        )


def _blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    """b's left columns fade in over a's right columns, in place. # ref: diffusers AutoencoderKL.blend_h"""
    e = min(a.shape[3], b.shape[3], extent)
    if e > 0:
        x = np.arange(e, dtype=np.float64) / e
        b[:, :, :, :e] = a[:, :, :, -e:] * (1 - x).astype(np.float32) + b[:, :, :, :e] * x.astype(np.float32)


Call = Callable[[np.ndarray], np.ndarray]


def _tiled(call: Call, x: np.ndarray, tile: int, step: int, blend: int, limit: int, after_shape=None) -> np.ndarray:
    """Run `call` on x's overlapping tiles (tile x tile from every step-th row/column, smaller at the borders),
    blend each with its upper and left neighbours (already blended, in place, as diffusers does) and keep its first
    `limit` rows and columns. The calls are grouped by tile shape, each shape compiles once; after_shape() runs
    when a shape's last tile is done (the pipeline releases that compiled model: one tile shape in memory at once)."""
    rows, cols = range(0, x.shape[2], step), range(0, x.shape[3], step)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in rows:
        for j in cols:
            groups.setdefault((min(tile, x.shape[2] - i), min(tile, x.shape[3] - j)), []).append((i, j))
    out = {}
    for boxes in groups.values():
        for i, j in boxes:
            out[i, j] = np.array(call(np.ascontiguousarray(x[:, :, i : i + tile, j : j + tile])), np.float32)
        if after_shape is not None:
            after_shape()
    result_rows = []
    for a, i in enumerate(rows):
        row = []
        for b, j in enumerate(cols):
            t = out[i, j]
            if a:
                _blend_v(out[rows[a - 1], j], t, blend)
            if b:
                _blend_h(out[i, cols[b - 1]], t, blend)
            row.append(t[:, :, :limit, :limit])
        result_rows.append(np.concatenate(row, axis=3))
    return np.concatenate(result_rows, axis=2)


def tiled_decode(call: Call, latents: np.ndarray, tiles: Tiles, after_shape=None) -> np.ndarray:
    """call: [B, C, t, t'] latents -> [B, 3, 8t, 8t'] pixels. # ref: diffusers AutoencoderKL.tiled_decode"""
    step = int(tiles.latent * (1 - OVERLAP))
    blend = int(tiles.sample * OVERLAP)
    return _tiled(call, latents, tiles.latent, step, blend, tiles.sample - blend, after_shape)


def tiled_encode(call: Call, image: np.ndarray, tiles: Tiles, after_shape=None) -> np.ndarray:
    """call: [B, 3, T, T'] pixels -> [B, 2C, T/8, T'/8] moments. # ref: diffusers AutoencoderKL._tiled_encode"""
    step = int(tiles.sample * (1 - OVERLAP))
    blend = int(tiles.latent * OVERLAP)
    return _tiled(call, image, tiles.sample, step, blend, tiles.latent - blend, after_shape)


def decode_bytes(info: ModelInfo, height: int, width: int) -> int:
    """Bytes of activations one full-VAE decode of height x width pixels holds at once (a floor): the largest
    feature maps (ModelInfo.memory_estimate) plus the mid-block attention's scores, tokens^2 f32 values at the
    latent size (SDXL at 1024x1024: 128x128 tokens, 1 GiB; at 2048x2048: 16 GiB)."""
    f = info.vae_scale_factor
    tokens = max(height // f, 1) * max(width // f, 1)
    return info.memory_estimate(height, width)["vae_decoder"] + tokens * tokens * 4


def choose_tiles(info: ModelInfo, height: int, width: int, mode: str = "auto", tile_size: int | None = None,
                 available: float | None = None) -> Tiles | None:  # fmt: skip
    """The tiles a full decode (or encode) of height x width uses, None for none. "on": diffusers' enable_tiling();
    "off": never; "auto": tiled when the untiled decode's activations (decode_bytes, with headroom) exceed the
    memory available now, then with the tile size asked, or the config's halved (down to 256 px) while one tile
    would not fit either. `available`: bytes (default runtime.memory.available_memory(); None: unknown, no tiles)."""
    if mode == "off":
        return None
    tiles = Tiles.of(info, tile_size)
    if mode == "on":
        return tiles
    if available is None:
        available = available_memory()
    if available is None or AUTO_HEADROOM * decode_bytes(info, height, width) <= available:
        return None
    if tile_size is None:
        while (
            tiles.sample > AUTO_MIN_TILE and AUTO_HEADROOM * decode_bytes(info, tiles.sample, tiles.sample) > available
        ):
            tiles = Tiles(tiles.sample // 2, tiles.latent // 2)
    return tiles
