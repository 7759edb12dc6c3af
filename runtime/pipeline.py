"""Load an SDXL-family OpenVINO model folder and generate; the denoising loop yields per-step state.

# ref: diffusers StableDiffusionXLPipeline.__call__ (v0.42)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import openvino as ov

from runtime.errors import RuntimeInputError
from runtime.generation import Generation, GenerationResult, StepState
from runtime.image import to_uint8
from runtime.ov_model import OVModel
from runtime.text import TextEncoder
from runtime.tokenizer import Tokenizer

__all__ = ["SDXLPipeline", "Generation", "GenerationResult", "StepState"]

PRECISIONS = ("f32", "bf16", "f16")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdxl-openvino" / "ov_cache"


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
    digests = []
    for path in bins:
        with open(path, "rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").digest())
    return digests[0] == digests[1] and _graph(a) == _graph(b)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeInputError(f"{path.parent}: no {path.name} (not a converted SDXL model folder?)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RuntimeInputError(f"{path}: unreadable ({e})") from None


class SDXLPipeline:
    def __init__(
        self,
        model_dir: str | Path,
        device: str = "CPU",
        precision: str | None = None,
        cache_dir: str | Path | None = "default",
        core: ov.Core | None = None,
        share_with: SDXLPipeline | None = None,
        low_memory: bool = False,
    ):
        """share_with: another loaded pipeline (the base, for a refiner) whose text_encoder_2 and VAE are reused,
        compiled once, when both folders hold the same IR files (SDXL's refiner ships the base's).
        low_memory: compile each model when its stage starts and release it when the stage ends (text encoders,
        UNet, VAE); the text encoders and the VAE recompile from the model cache, the UNet from its IR."""
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise RuntimeInputError(f"{model_dir}: no such model folder")
        if precision is not None and precision not in PRECISIONS:
            raise RuntimeInputError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)} (or omit)")
        self.core = core or ov.Core()
        if device.split(":")[0].split(".")[0] not in ("AUTO", "MULTI", "HETERO", "BATCH") and not any(
            d.startswith(device) for d in self.core.available_devices
        ):
            raise RuntimeInputError(f"device {device!r} not available; this machine has {self.core.available_devices}")
        if share_with is not None:
            core = share_with.core
        if cache_dir == "default":
            cache_dir = default_cache_dir()
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(cache_dir)})
        self.device, self.precision, self.low_memory = device, precision, low_memory
        self.index = _read_json(self.dir / "model_index.json")
        self.scheduler_config = _read_json(self.dir / "scheduler" / "scheduler_config.json")
        self.unet_config = _read_json(self.dir / "unet" / "config.json")
        self.vae_config = _read_json(self.dir / "vae_decoder" / "config.json")
        # metadata, not folder names: a refiner's model_index has no text_encoder
        self.is_refiner = not (self.index.get("text_encoder") or [None])[0]
        self.force_zeros_for_empty_prompt = bool(self.index.get("force_zeros_for_empty_prompt", True))
        self.requires_aesthetics_score = bool(self.index.get("requires_aesthetics_score", False))
        self.vae_scale_factor = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        self.default_size = int(self.unet_config.get("sample_size", 128)) * self.vae_scale_factor
        self.time_cond_proj_dim = self.unet_config.get("time_cond_proj_dim")
        # VAE latent normalisation: scaling_factor, and per-channel mean/std where the config has them
        self.scaling_factor = np.float32(self.vae_config.get("scaling_factor", 0.13025))
        self.latents_mean = self.latents_std = None
        if self.vae_config.get("latents_mean") is not None and self.vae_config.get("latents_std") is not None:
            self.latents_mean = np.asarray(self.vae_config["latents_mean"], np.float32).reshape(1, -1, 1, 1)
            self.latents_std = np.asarray(self.vae_config["latents_std"], np.float32).reshape(1, -1, 1, 1)

        cfg = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        # SDXL's VAE overflows in f16 (force_upcast); bf16 has f32's range.
        vae_cfg = (
            {"INFERENCE_PRECISION_HINT": "f32"}
            if precision == "f16" and self.vae_config.get("force_upcast", True)
            else cfg
        )
        # Low memory: the UNet compiles from its IR, not from the model cache. A cache hit first hashes the IR (every
        # weight page read) and then maps the blob: both at once, on top of the compiled model (SDXL fp16 UNet:
        # 14.0 GiB peak from the cache against 9.9 GiB from the IR, for 3 s of compile time).
        unet_cfg = {**cfg, "CACHE_DIR": ""} if low_memory else cfg
        self.unet = OVModel(self.core, self.dir / "unet" / "openvino_model.xml", device, unet_cfg)
        self.vae_decoder = OVModel(self.core, self.dir / "vae_decoder" / "openvino_model.xml", device, vae_cfg)
        self._vae_encoder_cfg = vae_cfg
        self._vae_encoder = None
        self.text_encoders = []
        pairs = [("tokenizer_2", "text_encoder_2")] if self.is_refiner else [
            ("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]  # fmt: skip
        for tok, enc in pairs:
            try:
                tokenizer = Tokenizer(self.core, self.dir / tok / "openvino_tokenizer.xml")
            except FileNotFoundError:
                raise RuntimeInputError(f"{self.dir}: no {tok}/openvino_tokenizer.xml (submodel missing)") from None
            encoder = OVModel(self.core, self.dir / enc / "openvino_model.xml", device, cfg)
            self.text_encoders.append(TextEncoder(tokenizer, encoder))
        self.shared: list[str] = []
        if share_with is not None:
            self._share(share_with)

    def _share(self, other: SDXLPipeline) -> None:
        if (self.device, self.precision) != (other.device, other.precision):
            return
        if same_ir(self.vae_decoder.xml, other.vae_decoder.xml):
            self.vae_decoder = other.vae_decoder
            self.shared.append("vae_decoder")
        if same_ir(self.dir / "vae_encoder" / "openvino_model.xml", other.dir / "vae_encoder" / "openvino_model.xml"):
            self._vae_encoder = other.vae_encoder
            self.shared.append("vae_encoder")
        mine, theirs = self.text_encoders[-1], other.text_encoders[-1]  # text_encoder_2 in both
        if same_ir(mine.encoder.xml, theirs.encoder.xml):
            self.text_encoders[-1] = theirs
            self.shared.append("text_encoder_2")

    @property
    def vae_encoder(self) -> OVModel:
        if self._vae_encoder is None:
            xml = self.dir / "vae_encoder" / "openvino_model.xml"
            self._vae_encoder = OVModel(self.core, xml, self.device, self._vae_encoder_cfg)
        return self._vae_encoder

    def __call__(self, **kwargs) -> GenerationResult:
        return self.generate(**kwargs).result()

    def generate(self, **kwargs) -> Generation:
        """Validate the parameters and return the generation; iterate it for per-step state."""
        return Generation(self, kwargs)

    def encode_image(self, image: np.ndarray, generator) -> np.ndarray:
        """[B, 3, H, W] in [-1, 1] -> scaled latents, sampling the VAE posterior with `generator`.
        # ref: diffusers retrieve_latents(sample_mode="sample") + DiagonalGaussianDistribution.sample"""
        moments = self.vae_encoder({"sample": image})["latent_parameters"]  # [B, 8, h, w]
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
        latents = mean + std * generator.randn(mean.shape)
        if self.latents_mean is not None:
            return ((latents - self.latents_mean) * self.scaling_factor / self.latents_std).astype(np.float32)
        return (self.scaling_factor * latents).astype(np.float32)

    def release(self) -> None:
        """Free the compiled UNet and text encoders: low-memory mode between the base and the refiner. The next
        call compiles again, fast with the model cache."""
        self.unet.release()
        for enc in self.text_encoders:
            enc.encoder.release()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """[N, 4, h, w] latents -> [N, H, W, 3] uint8, one image per VAE call (lower peak memory, same numbers)."""
        if self.latents_mean is not None:
            scaled = latents * self.latents_std / self.scaling_factor + self.latents_mean
        else:
            scaled = latents / self.scaling_factor
        images = [
            to_uint8(self.vae_decoder({"latent_sample": scaled[i : i + 1]})["sample"]) for i in range(len(scaled))
        ]
        return np.concatenate(images)
