"""Load an SDXL-family OpenVINO model folder and generate; the denoising loop yields per-step state.

# ref: diffusers StableDiffusionXLPipeline.__call__ (v0.42)
"""

from __future__ import annotations

import hashlib
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import openvino as ov

from runtime.errors import RuntimeInputError
from runtime.generation import Generation, GenerationResult, Refinement, StageCallback, StepState
from runtime.image import to_uint8
from runtime.lora_api import LoraMixin
from runtime.memory import memory_limit, tiling_budget
from runtime.model_cache import default_cache_dir
from runtime.ov_model import OVModel
from runtime.params import GenerationParams, ModelInfo
from runtime.per_image import PerImage
from runtime.text import TextEncoder
from runtime.tokenizer import Tokenizer
from runtime.vae import Tiles, TinyVAE, choose_tiles, tiled_decode, tiled_encode

__all__ = ["SDXLPipeline", "Generation", "GenerationResult", "GenerationParams", "ModelInfo", "StepState"]

PRECISIONS = ("f32", "bf16", "f16")
# the names each submodel's IR must have: the runtime calls them by these names
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")


def _graph(xml: Path) -> str:
    """The IR's graph with the counters OpenVINO puts in generated names (Model89, Constant_156865) masked."""
    return re.sub(r'name="[^"]*"', lambda m: re.sub(r"\d+", "#", m.group()), xml.read_text())


def same_ir(a: Path, b: Path) -> bool:
    """Both IRs hold the same weights (bin: size, then SHA-256) and the same graph (xml, generated names masked)."""
    bins = (a.with_suffix(".bin"), b.with_suffix(".bin"))
    if not all(p.is_file() for p in (a, b, *bins)) or bins[0].stat().st_size != bins[1].stat().st_size:
        return False
    if a.resolve() == b.resolve():
        return True
    return _sha256(bins[0]) == _sha256(bins[1]) and _graph(a) == _graph(b)


def _sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def _first_run(gen) -> Generation:
    """The generation that runs first: the first single-image run of a per-image batch, a refinement's base."""
    while not isinstance(gen, Generation):  # PerImage (runs), Refinement (base)
        gen = gen.runs[0] if hasattr(gen, "runs") else gen.base
    return gen


def _encodes_pixels(gen) -> bool:
    """The generation VAE-encodes an image: img2img or inpainting from pixels, not from latents."""
    gen = _first_run(gen)
    return (gen._image is not None and gen._image.shape[1] == 3) or (
        gen.inpaint is not None and not gen.inpaint.latent_image
    )


class SDXLPipeline(LoraMixin):
    """A loaded model folder (and optionally its refiner): the one object the CLI, a server or a program calls.

    pipe = SDXLPipeline("./sdxl-base-ov", refiner="./sdxl-refiner-ov")
    result = pipe(prompt="a lighthouse", high_noise_frac=0.8)   # or refiner_strength=0.3, or neither (0.3)
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "CPU",
        precision: str | None = None,
        cache_dir: str | Path | None = "default",
        core: ov.Core | None = None,
        share_with: SDXLPipeline | None = None,
        low_memory: bool = False,
        refiner: str | Path | SDXLPipeline | None = None,
        max_memory_gb: float | None = None,
    ):
        """cache_dir: OpenVINO's model cache ("default": runtime.model_cache.default_cache_dir(); None or "": off).
        share_with: another loaded pipeline (the base, for a refiner) whose text_encoder_2 and VAE are reused,
        compiled once, when both folders hold the same IR files (SDXL's refiner ships the base's).
        low_memory: compile each model when its stage starts and release it when the stage ends (text encoders,
        UNet, VAE); the text encoders and the VAE recompile from the model cache, the UNet from its IR.
        refiner: a refiner folder (loaded with these settings, sharing what it can) or a loaded refiner pipeline;
        every call then runs the base -> refiner chain (high_noise_frac or refiner_strength).
        max_memory_gb: a generation whose estimated memory (ModelInfo.memory_estimate) exceeds this many GiB is
        refused before any work; default $SDXL_OPENVINO_MAX_MEMORY_GB, else the memory available when it starts
        (float("inf"): no check)."""
        if precision is not None and precision not in PRECISIONS:
            raise RuntimeInputError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)} (or omit)")
        memory_limit(max_memory_gb)  # a bad value fails now, not at the first generation
        self.max_memory_gb = max_memory_gb
        self.info = info = ModelInfo.load(model_dir)
        self.dir = info.dir
        self.core = core or ov.Core()
        if device.split(":")[0].split(".")[0] not in ("AUTO", "MULTI", "HETERO", "BATCH") and not any(
            d.startswith(device) for d in self.core.available_devices
        ):
            raise RuntimeInputError(f"device {device!r} not available; this machine has {self.core.available_devices}")
        if cache_dir == "default":
            cache_dir = default_cache_dir()
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self.cache_dir = str(cache_dir or "")
        self.device, self.precision, self.low_memory = device, precision, low_memory

        # the model cache goes with each compile, not on the Core (which may be the caller's)
        cfg = {"CACHE_DIR": self.cache_dir, **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}
        # SDXL's VAE overflows in f16 (force_upcast); bf16 has f32's range.
        vae_cfg = {**cfg, "INFERENCE_PRECISION_HINT": "f32"} if precision == "f16" and info.force_upcast else cfg
        # Low memory: the UNet compiles from its IR, not from the model cache. A cache hit first hashes the IR (every
        # weight page read) and then maps the blob: both at once, on top of the compiled model (SDXL fp16 UNet:
        # 14.0 GiB peak from the cache against 9.9 GiB from the IR, for 3 s of compile time).
        unet_cfg = {**cfg, "CACHE_DIR": ""} if low_memory else cfg
        self.unet = OVModel(self.core, self.dir / "unet" / "openvino_model.xml", device, unet_cfg,
                            inputs=UNET_INPUTS, outputs=("out_sample",))  # fmt: skip
        channels = self.unet.input_shapes["sample"][1] if self.unet.input_shapes["sample"].rank.is_static else None
        if channels is not None and channels.is_static and channels.get_length() != info.in_channels:
            raise RuntimeInputError(f"{self.dir / 'unet' / 'config.json'}: in_channels={info.in_channels} but the "
                                    f"UNet IR takes {channels.get_length()} channels")  # fmt: skip
        self.vae_decoder = OVModel(self.core, self.dir / "vae_decoder" / "openvino_model.xml", device, vae_cfg,
                                   inputs=("latent_sample",), outputs=("sample",))  # fmt: skip
        self._vae_decoder_f32: OVModel | None = None  # a decode that overflowed in bf16/f16 is redone in f32
        self._vae_lock = threading.Lock()
        self._vae_encoder_cfg = vae_cfg
        self._vae_encoder = None
        self.tiny_vae = TinyVAE(self.core, self.dir, device, vae_cfg)  # compiled on first use (runtime.vae)
        self.text_encoders = []
        pairs = [("tokenizer_2", "text_encoder_2")] if info.is_refiner else [
            ("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]  # fmt: skip
        for tok, enc in pairs:
            try:
                tokenizer = Tokenizer(self.core, self.dir / tok / "openvino_tokenizer.xml")
            except FileNotFoundError:
                raise RuntimeInputError(f"{self.dir}: no {tok}/openvino_tokenizer.xml (submodel missing)") from None
            encoder = OVModel(self.core, self.dir / enc / "openvino_model.xml", device, cfg, inputs=("input_ids",))
            self.text_encoders.append(TextEncoder(tokenizer, encoder))
        self.unet_observers: list = []  # callables handed each UNet call's inputs (runtime.denoise.UNetDenoiser)
        self.shared: list[str] = []
        if share_with is not None:
            self._share(share_with)
        self.refiner: SDXLPipeline | None = None
        if refiner is not None:
            self.refiner = refiner if isinstance(refiner, SDXLPipeline) else SDXLPipeline(
                refiner, device=device, precision=precision, cache_dir=cache_dir or None, core=self.core,
                share_with=self, low_memory=low_memory, max_memory_gb=max_memory_gb)  # fmt: skip
            if not self.refiner.info.is_refiner:
                raise RuntimeInputError(f"refiner {refiner}: not a refiner folder (its model_index has a text_encoder)")

    # the folder's facts, as attributes for callers of earlier versions
    @property
    def is_refiner(self) -> bool:
        return self.info.is_refiner

    @property
    def scheduler_config(self) -> dict:
        return self.info.scheduler_config

    @property
    def vae_scale_factor(self) -> int:
        return self.info.vae_scale_factor

    @property
    def default_size(self) -> int:
        return self.info.default_size

    @property
    def time_cond_proj_dim(self) -> int | None:
        return self.info.time_cond_proj_dim

    def _share(self, other: SDXLPipeline) -> None:
        if (self.device, self.precision) != (other.device, other.precision):
            return
        if same_ir(self.vae_decoder.xml, other.vae_decoder.xml):
            self.vae_decoder = other.vae_decoder
            self.shared.append("vae_decoder")
        if same_ir(self.dir / "vae_encoder" / "openvino_model.xml", other.dir / "vae_encoder" / "openvino_model.xml"):
            self._vae_encoder = other.vae_encoder
            self.shared.append("vae_encoder")
        if not self.tiny_vae.available and other.tiny_vae.available:  # a refiner decodes the base's latent space
            self.tiny_vae = other.tiny_vae
            self.shared.append("vae_decoder_tiny")
        mine, theirs = self.text_encoders[-1], other.text_encoders[-1]  # text_encoder_2 in both
        if same_ir(mine.encoder.xml, theirs.encoder.xml):
            self.text_encoders[-1] = theirs
            self.shared.append("text_encoder_2")

    @property
    def vae_encoder(self) -> OVModel:
        if self._vae_encoder is None:
            xml = self.dir / "vae_encoder" / "openvino_model.xml"
            self._vae_encoder = OVModel(self.core, xml, self.device, self._vae_encoder_cfg, inputs=("sample",),
                                        outputs=("latent_parameters",))  # fmt: skip
        return self._vae_encoder

    # -- generating ---------------------------------------------------------------------------------------------
    def __call__(self, **kwargs) -> GenerationResult:
        """Generate with diffusers' keyword names (GenerationParams); returns the finished result."""
        return self.generate(**kwargs).result()

    def generate(self, on_stage: StageCallback | None = None, **kwargs) -> Generation | Refinement | PerImage:
        """Validate the parameters and return the generation; iterate it for per-step state, then `result()`.
        With a refiner: the base -> refiner chain, its steps numbered as one run. seed_mode="per-image" with
        more than one image: one single-image run per image (seeds seed, seed + 1, ...), numbered as one run.
        on_stage(name): called as each stage starts ("encode", "compile", "denoise", "decode"); settable later
        as the generation's `on_stage` attribute."""
        params = GenerationParams.create(**kwargs)
        if self.refiner is None and (params.high_noise_frac is not None or params.refiner_strength is not None):
            raise RuntimeInputError("high_noise_frac and refiner_strength need a refiner (SDXLPipeline(refiner=...))")
        params = self.with_presets(params)
        if params.vae_decoder == "tiny":  # a folder without a tiny VAE: one line, before any work
            (self.refiner or self).tiny_vae.require()  # the last stage decodes (a refiner shares the base's)
        if params.preview == "tiny":
            self.tiny_vae.require()
        if params.seed_mode == "per-image" and params.batch > 1:
            gen = PerImage(self, params)
        elif self.refiner is not None:
            gen = Refinement(self, self.refiner, params)
        else:
            gen = Generation(self, params)
        if params.vae_decoder == "tiny" and _encodes_pixels(gen):  # it encodes with the tiny VAE too (runtime.vae)
            self.tiny_vae.require(encoder=True)
        self.check_memory(gen)
        gen.on_stage = on_stage
        return gen

    def check_memory(self, gen) -> None:
        """Refuse a generation whose size does not fit in memory (ModelInfo.check_memory), before any work:
        the first single-image run of a per-image batch, the base's half of a refinement."""
        gen = _first_run(gen)
        info, p, image = gen.info, gen.params, gen._image
        if image is not None:  # image-to-image: the image's size (pixels, or latents)
            f = info.vae_scale_factor if image.shape[1] == info.in_channels else 1
            height, width = image.shape[-2] * f, image.shape[-1] * f
        else:
            height, width = p.height or info.default_size, p.width or info.default_size
        vae = dict(vae_decoder=p.vae_decoder, vae_tiling=p.vae_tiling, vae_tile_size=p.vae_tile_size)
        info.check_memory(height, width, gen.batch, gen.do_cfg, memory_limit(self.max_memory_gb), **vae)

    def generation(self, params: GenerationParams, handoff: bool = False) -> Generation:
        """A generation of this folder from checked parameters (the folder's presets applied)."""
        return Generation(self, self.with_presets(params), handoff=handoff)

    def with_presets(self, params: GenerationParams) -> GenerationParams:
        """Fill in what the caller left to the folder: steps, guidance and the LCM scheduler (ModelInfo.presets)."""
        return params.replace(**self.info.presets(params.scheduler, params.num_inference_steps, params.guidance_scale))

    # -- the stages' models -------------------------------------------------------------------------------------
    def encode_image(self, image: np.ndarray, generator, tiling: str = "off", tile_size: int | None = None,
                     vae: str = "full"):  # fmt: skip
        """[B, 3, H, W] in [-1, 1] -> scaled latents, sampling the VAE posterior with `generator`; tiling
        (runtime.vae.choose_tiles): the moments from overlapping tiles as diffusers' tiled encode. vae="tiny": the
        tiny encoder's latents x its scaling_factor, untiled, drawing nothing from `generator`.
        # ref: diffusers retrieve_latents(sample_mode="sample") + DiagonalGaussianDistribution.sample; with
        # pipe.vae = AutoencoderTiny, retrieve_latents returns .latents and latents_mean/std are None (v0.42)"""
        info = self.info
        if vae == "tiny":
            latents = self.tiny_vae.encode(image)
            self.done_with(self.tiny_vae.encoder)
            return latents
        budget = tiling_budget(self.max_memory_gb)  # what vae_tiling="auto" decides against
        tiles = choose_tiles(info, image.shape[-2], image.shape[-1], tiling, tile_size, budget)
        if tiles is not None and tiles.tiles_encode(image.shape):
            call = lambda tile: self.vae_encoder({"sample": tile})["latent_parameters"]  # noqa: E731
            moments = tiled_encode(call, image, tiles, self.vae_encoder.release)  # [B, 8, h, w]
        else:
            moments = self.vae_encoder({"sample": image})["latent_parameters"]  # [B, 8, h, w]
        self.done_with(self.vae_encoder)
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
        latents = mean + std * generator.randn(mean.shape)
        if info.latents_mean is not None:
            return ((latents - info.latents_mean) * info.scaling_factor / info.latents_std).astype(np.float32)
        return (info.scaling_factor * latents).astype(np.float32)

    def vae_tiles(self, latents_shape, tiling: str = "auto", tile_size: int | None = None) -> Tiles | None:
        """The tiles a full decode of latents of this shape runs on (runtime.vae.choose_tiles), None: untiled."""
        f = self.info.vae_scale_factor
        tiles = choose_tiles(self.info, latents_shape[-2] * f, latents_shape[-1] * f, tiling, tile_size,
                             tiling_budget(self.max_memory_gb))  # fmt: skip
        return tiles if tiles is not None and tiles.tiles_decode(latents_shape) else None

    def decode(self, latents: np.ndarray, decoder: str = "full", tiles: Tiles | None = None) -> np.ndarray:
        """[N, 4, h, w] latents -> [N, H, W, 3] uint8, one image per VAE call (lower peak memory, same numbers).

        NaN or inf never becomes a black image: a decode that gives them in bf16/f16 is done again in f32 (as
        diffusers' force_upcast does; with a RuntimeWarning, and in f32 for this pipeline's later decodes), one
        that gives them in f32 is a RuntimeInputError."""
        info = self.info
        if not np.isfinite(latents).all():
            raise RuntimeInputError("the latents to decode hold NaN or inf")
        if decoder == "tiny":  # as diffusers with pipe.vae = AutoencoderTiny: latents / its scaling_factor
            images = self.tiny_vae.decode(latents)
            self.done_with(self.tiny_vae.decoder)
            return images
        if info.latents_mean is not None:
            scaled = latents * info.latents_std / info.scaling_factor + info.latents_mean
        else:
            scaled = latents / info.scaling_factor
        if tiles is not None:  # each tile a call of its own (NaN handled per call), one tile shape compiled at a time
            release = lambda: [m.release() for m in (self.vae_decoder, self._vae_decoder_f32) if m is not None]  # noqa: E731
            images = [to_uint8(tiled_decode(self._decode_one, scaled[i : i + 1], tiles, release))
                      for i in range(len(scaled))]  # fmt: skip
        else:
            images = [to_uint8(self._decode_one(scaled[i : i + 1])) for i in range(len(scaled))]
        self.done_with(self.vae_decoder)
        if self._vae_decoder_f32 is not None:
            self.done_with(self._vae_decoder_f32)
        return np.concatenate(images)

    def _decode_one(self, scaled: np.ndarray) -> np.ndarray:
        """One image's VAE decode, never NaN/inf: see decode()."""
        f32 = self._vae_decoder_f32
        sample = (f32 or self.vae_decoder)({"latent_sample": scaled})["sample"]
        if np.isfinite(sample).all():
            return sample
        precision = "f32" if f32 is not None else self.vae_decoder.precision()
        if precision != "f32":  # diffusers' force_upcast: SDXL's VAE overflows in f16
            warnings.warn(
                f"the VAE decoder gave NaN/inf in {precision or 'the device precision'}: decoding in f32 from now on",
                RuntimeWarning,
                stacklevel=2,
            )
            with self._vae_lock:
                if self._vae_decoder_f32 is None:
                    config = {**self.vae_decoder.config, "INFERENCE_PRECISION_HINT": "f32"}
                    self._vae_decoder_f32 = OVModel(self.core, self.vae_decoder.xml, self.device, config,
                                                    inputs=("latent_sample",), outputs=("sample",))  # fmt: skip
            sample = self._vae_decoder_f32({"latent_sample": scaled})["sample"]
            if np.isfinite(sample).all():
                return sample
        scale = float(self.info.scaling_factor)
        raise RuntimeInputError(
            f"{self.vae_decoder.xml}: the VAE decoder produced NaN/inf in f32 from finite latents (NaN/inf "
            f"weights, or latents out of its range: scaling_factor {scale:g})"
        )

    def done_with(self, model: OVModel) -> None:
        """A model's stage has ended: release it (low memory) or free its activation buffers."""
        if self.low_memory:
            model.release()
        else:
            model.trim()

    def release(self) -> None:
        """Free the compiled UNet and text encoders: low-memory mode between the base and the refiner. The next
        call compiles again, fast with the model cache."""
        self.unet.release()
        for enc in self.text_encoders:
            enc.encoder.release()
