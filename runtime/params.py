"""What a loaded model folder is (`ModelInfo`) and what one generation asks for (`GenerationParams`).

Both are frozen and validated once, here: every other part of the runtime reads typed fields. The parameter
names are diffusers' (StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline.__call__), plus the two of
the base -> refiner hand-off the CLI has always had: `high_noise_frac` (ensemble of experts) and
`refiner_strength` (SDEdit refinement).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import RuntimeInputError

OUTPUT_TYPES = ("np", "pil", "latent")
MAX_CONFIG_BYTES = 1 << 20  # a diffusers config is a few KB: anything larger is not one
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed
LCM_NAMES = ("lcm", "lcmscheduler")
MAX_SIDE = 16384  # pixels: an absolute cap on height and width, before any memory estimate
MAX_TRAIN_TIMESTEPS = 100_000  # SDXL's schedulers have 1000; the sigma tables are this long
# batch: diffusers' noise, one draw for the whole batch (image i needs the batch to be made again);
# per-image: A1111's, image i of the batch is the single-image generation with seed + i
SEED_MODES = ("batch", "per-image")
DEEPCACHE_SCHEDULES = ("uniform", "quadratic")  # runtime.deepcache.full_steps


# -- the model folder -------------------------------------------------------------------------------------------
def regular_file(path: Path, missing: str) -> os.stat_result:
    """The stat of a regular file (a FIFO would hang a read, /dev/zero would never end), else one clear error;
    `missing` says what an absent file means."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise RuntimeInputError(f"{path.parent}: no {path.name} ({missing})") from None
    except OSError as e:
        raise RuntimeInputError(f"{path}: unreadable ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise RuntimeInputError(f"{path}: not a regular file")
    return st


def read_json(path: Path) -> dict:
    """A config file as a dict: a regular file of sane size holding a JSON object, else one clear error."""
    st = regular_file(path, "not a converted SDXL model folder?")
    if st.st_size > MAX_CONFIG_BYTES:
        raise RuntimeInputError(f"{path}: {st.st_size} bytes, too large for a config file")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RuntimeInputError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise RuntimeInputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _positive_int(config: dict, key: str, default: int, path: Path, limit: int = 1 << 16) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise RuntimeInputError(f"{path}: {key}={value!r} must be an integer in 1..{limit}")
    return value


def _finite(config: dict, key: str, default: float, path: Path, positive: bool = True) -> np.float32:
    value = config.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise RuntimeInputError(f"{path}: {key}={value!r} must be a finite{' positive' if positive else ''} number")
    return np.float32(value)


def _check_scheduler(config: dict, path: Path) -> None:
    """The keys that size the scheduler's tables or can make its sigmas non-finite: one clear line each."""
    n = config.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TRAIN_TIMESTEPS:
        raise RuntimeInputError(f"{path}: num_train_timesteps={n!r} must be an integer in 1..{MAX_TRAIN_TIMESTEPS}")
    trained = config.get("trained_betas")
    if trained is not None:
        ok = isinstance(trained, list) and len(trained) == n
        ok = ok and all(_is_real(b) and math.isfinite(b) and 0 <= b <= 1 for b in trained)
        if not ok:
            raise RuntimeInputError(f"{path}: trained_betas must be {n} numbers in [0, 1] (num_train_timesteps)")
        return
    start = _finite(config, "beta_start", 0.0001, path)
    end = _finite(config, "beta_end", 0.02, path)
    if not start < end < 1:
        b0, b1 = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
        raise RuntimeInputError(f"{path}: beta_end={b1!r} must be above beta_start={b0!r} and below 1")


@dataclass(frozen=True, eq=False)
class ModelInfo:
    """Everything the runtime needs to know about a converted folder, read from its files (never guessed)."""

    dir: Path
    index: dict
    scheduler_config: dict
    unet_config: dict
    vae_config: dict
    is_refiner: bool  # metadata, not folder names: a refiner's model_index has no text_encoder
    force_zeros_for_empty_prompt: bool
    requires_aesthetics_score: bool
    vae_scale_factor: int
    default_size: int  # pixels: the UNet's sample size x the VAE factor
    in_channels: int
    time_cond_proj_dim: int | None  # LCM's w-embedding size, when the UNet has one
    scaling_factor: np.float32
    latents_mean: np.ndarray | None  # [1, C, 1, 1] where the VAE config has per-channel statistics
    latents_std: np.ndarray | None
    force_upcast: bool

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelInfo:
        d = Path(model_dir)
        if not d.is_dir():
            raise RuntimeInputError(f"{model_dir}: no such model folder")
        index = read_json(d / "model_index.json")
        scheduler_path = d / "scheduler" / "scheduler_config.json"
        scheduler_config = read_json(scheduler_path)
        _check_scheduler(scheduler_config, scheduler_path)
        unet_path, vae_path = d / "unet" / "config.json", d / "vae_decoder" / "config.json"
        unet_config, vae_config = read_json(unet_path), read_json(vae_path)
        blocks = vae_config.get("block_out_channels", [128, 256, 512, 512])
        if (
            not isinstance(blocks, list)
            or not 1 <= len(blocks) <= 8
            or not all(_is_int(c) and 0 < c <= 1 << 16 for c in blocks)
        ):
            raise RuntimeInputError(
                f"{vae_path}: block_out_channels={blocks!r} must be a list of 1 to 8 positive integers"
            )
        vae_scale_factor = 2 ** (len(blocks) - 1)
        sample_size = _positive_int(unet_config, "sample_size", 128, unet_path, limit=1 << 12)
        in_channels = _positive_int(unet_config, "in_channels", 4, unet_path)
        latent_channels = _positive_int(vae_config, "latent_channels", 4, vae_path)
        if in_channels != latent_channels:
            kind = " (an inpainting UNet: not supported yet)" if in_channels == 9 else ""
            raise RuntimeInputError(f"{unet_path}: in_channels={in_channels} but the VAE has {latent_channels}{kind}")
        tcpd = unet_config.get("time_cond_proj_dim")
        if tcpd is not None:
            tcpd = _positive_int(unet_config, "time_cond_proj_dim", 0, unet_path)
        mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
        if mean is not None and std is not None:
            try:
                mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
                std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
            except (TypeError, ValueError):
                raise RuntimeInputError(f"{vae_path}: latents_mean/latents_std must be lists of numbers") from None
            if mean.shape[1] != latent_channels or std.shape[1] != latent_channels:
                raise RuntimeInputError(
                    f"{vae_path}: latents_mean/latents_std have {mean.shape[1]}/{std.shape[1]} entries, "
                    f"the latents have {latent_channels} channels"
                )
            if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
                raise RuntimeInputError(f"{vae_path}: latents_mean/latents_std must be finite, std positive")
        else:
            mean = std = None
        return cls(
            dir=d,
            index=index,
            scheduler_config=scheduler_config,
            unet_config=unet_config,
            vae_config=vae_config,
            is_refiner=not _first(index.get("text_encoder")),
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
            vae_scale_factor=vae_scale_factor,
            default_size=sample_size * vae_scale_factor,
            in_channels=in_channels,
            time_cond_proj_dim=tcpd,
            scaling_factor=_finite(vae_config, "scaling_factor", 0.13025, vae_path),
            latents_mean=mean,
            latents_std=std,
            force_upcast=bool(vae_config.get("force_upcast", True)),
        )

    def memory_estimate(self, height: int, width: int, batch: int = 1, cfg: bool = True) -> dict[str, int]:
        """runtime.memory.estimate for this folder."""
        from runtime import memory

        return memory.estimate(self, height, width, batch, cfg)

    def check_memory(self, height: int, width: int, batch: int = 1, cfg: bool = True, limit: float | None = None):
        """Refuse (RuntimeInputError) a size whose memory estimate exceeds `limit` bytes (runtime.memory.check)."""
        from runtime import memory

        memory.check(self, height, width, batch, cfg, limit)

    @property
    def is_lcm(self) -> bool:
        """The folder is made for LCM sampling: an LCM scheduler config, or a w-embedding (distilled) UNet."""
        return self.scheduler_config.get("_class_name") == "LCMScheduler" or bool(self.time_cond_proj_dim)

    def presets(self, scheduler: str | None, steps: int | None, guidance_scale: float | None) -> dict:
        """The defaults for this folder: diffusers' SDXL ones (50 steps, guidance 5), or the LCM recipe (4 steps,
        guidance 8 with a w-embedding UNet, else 1) when the folder says LCM or `scheduler` asks for it. What
        the caller gave wins; a non-LCM folder asked for LCM sampling gets the scheduler name "lcm"."""
        asked = (scheduler or "").lower() in LCM_NAMES
        lcm = asked or (scheduler is None and self.is_lcm)
        if scheduler is None and lcm and self.scheduler_config.get("_class_name") != "LCMScheduler":
            scheduler = "lcm"
        if steps is None:
            steps = 4 if lcm else 50
        if guidance_scale is None:
            guidance_scale = (8.0 if self.time_cond_proj_dim else 1.0) if lcm else 5.0
        return {"scheduler": scheduler, "num_inference_steps": steps, "guidance_scale": guidance_scale}


# -- one generation ---------------------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _first(entry: Any) -> Any:
    """A model_index entry's library name (["transformers", "CLIPTextModel"] -> "transformers"; [null, null] and
    anything else falsy -> None)."""
    if isinstance(entry, list):
        return entry[0] if entry else None
    return entry or None


def _prompt_list(value: Any, name: str, required: bool = False) -> None:
    if value is None and not required:
        return
    if isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return
    raise RuntimeInputError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}")


def _pair(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise RuntimeInputError(f"{name}={value!r} must be a pair of integers")
    return int(value[0]), int(value[1])


@dataclass(frozen=True, eq=False)
class GenerationParams:
    """One generation's parameters with diffusers' names; `GenerationParams.create(**kwargs)` validates them.

    None means "the default": for num_inference_steps, guidance_scale and scheduler the folder's presets
    (ModelInfo.presets), for height/width the UNet's sample size, for seed a random one (drawn when the
    generation starts and recorded in its result)."""

    prompt: str | list[str] | None = None
    prompt_2: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    num_images_per_prompt: int = 1
    seed: int | None = None
    seed_mode: str = "batch"  # SEED_MODES; per-image: image i (prompt-major) uses seed + i
    latents: np.ndarray | None = None
    clip_skip: int | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    output_type: str = "np"
    scheduler: str | None = None
    denoising_end: float | None = None
    # image-to-image (and the refiner's half of the hand-off)
    image: Any = None
    strength: float = 0.3
    denoising_start: float | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # base -> refiner (used when the pipeline has a refiner)
    high_noise_frac: float | None = None
    refiner_strength: float | None = None
    # the VAE (runtime.vae): the final image's decoder, tiled decode/encode, previews per step (gen.preview(state))
    vae_decoder: str = "full"  # "full" | "tiny" (the folder's vae_decoder_tiny/, convert --tiny-vae)
    vae_tiling: str = "auto"  # "auto" | "on" (diffusers' AutoencoderKL.enable_tiling()) | "off"
    vae_tile_size: int | None = None  # pixels; None: the VAE config's sample_size, as diffusers
    preview: str = "none"  # "none" | "approx" (latent -> RGB projection) | "tiny" (the tiny decoder)
    preview_every: int = 1
    # computing less per image (runtime.denoise): DeepCache (every N-th step the whole UNet, the shallow branch
    # between; 1 = off) with DeepCache's cache_branch_id, and the guidance cut-off (guidance stops after step
    # int(steps * F))
    deepcache_interval: int = 1
    deepcache_branch: int = 0
    deepcache_schedule: str = "uniform"  # DEEPCACHE_SCHEDULES; quadratic: sample_from_quad_center's full steps
    deepcache_center: float = 15.0
    deepcache_pow: float = 1.4
    guidance_cutoff: float | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def create(cls, **kwargs) -> GenerationParams:
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown parameter(s): {', '.join(unknown)}")
        return cls(**kwargs)._validated()

    def replace(self, **changes) -> GenerationParams:
        return dataclasses.replace(self, **changes)._validated()

    @property
    def batch(self) -> int:
        """Images made: prompts x num_images_per_prompt."""
        return (1 if isinstance(self.prompt, str) else len(self.prompt)) * self.num_images_per_prompt

    def public(self) -> dict:
        """The parameters as recorded with a result (the arrays and images left out)."""
        skip = ("latents", "image", "preview", "preview_every")  # previews do not change the image
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def _validated(self) -> GenerationParams:
        fix: dict[str, Any] = {}
        _prompt_list(self.prompt, "prompt", required=True)
        for name in ("prompt_2", "negative_prompt", "negative_prompt_2"):
            _prompt_list(getattr(self, name), name)
        for k in ("height", "width"):
            v = getattr(self, k)
            if v is not None and (not _is_int(v) or v <= 0 or v % 8):
                raise RuntimeInputError(f"{k}={v!r} must be a positive multiple of 8")
            if v is not None and v > MAX_SIDE:
                raise RuntimeInputError(f"{k}={v!r} is more than {MAX_SIDE} pixels")
        if self.latents is not None:
            try:
                latents = np.asarray(self.latents, dtype=np.float32)
            except (TypeError, ValueError):
                kind = type(self.latents).__name__
                raise RuntimeInputError(f"latents must be an array of numbers, got {kind}") from None
            if latents.ndim != 4:
                raise RuntimeInputError(f"latents have shape {list(latents.shape)}: expected [B, C, h, w]")
            if not np.isfinite(latents).all():
                raise RuntimeInputError("latents hold NaN or inf")
        if isinstance(self.image, np.ndarray) and self.image.dtype.kind == "f" and not np.isfinite(self.image).all():
            raise RuntimeInputError("image holds NaN or inf")
        for k in ("num_inference_steps", "num_images_per_prompt"):
            v = getattr(self, k)
            if v is not None and (not _is_int(v) or v < 1):
                raise RuntimeInputError(f"{k}={v!r} must be an integer of at least 1")
        g = self.guidance_scale
        if g is not None and (not _is_real(g) or not math.isfinite(g) or g >= 1e6):
            raise RuntimeInputError(f"guidance_scale={g!r} must be a finite number below 1e6")
        if g is not None and g < 0:
            raise RuntimeInputError(f"guidance_scale={g!r} must not be negative")
        if not _is_real(self.guidance_rescale) or not 0.0 <= self.guidance_rescale <= 1.0:
            raise RuntimeInputError(f"guidance_rescale={self.guidance_rescale!r} must be in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise RuntimeInputError(f"seed={self.seed!r} must be an integer in 0..2**64-1")
        if self.seed_mode not in SEED_MODES:
            raise RuntimeInputError(f"seed_mode={self.seed_mode!r}: choose one of {', '.join(SEED_MODES)}")
        if self.seed is not None and self.seed_mode == "per-image" and self.seed + self.batch - 1 > MAX_SEED:
            raise RuntimeInputError(f"seed={self.seed!r}: seed + {self.batch - 1} (the last image's) passes 2**64-1")
        if self.output_type not in OUTPUT_TYPES:
            raise RuntimeInputError(f"output_type={self.output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
        if self.clip_skip is not None and (not _is_int(self.clip_skip) or self.clip_skip < 0):
            raise RuntimeInputError(f"clip_skip={self.clip_skip!r} must be a non-negative integer")
        if not _is_real(self.strength) or not 0.0 <= self.strength <= 1.0:
            raise RuntimeInputError(f"strength={self.strength!r} must be in [0, 1]")
        for k in ("denoising_start", "denoising_end", "high_noise_frac"):
            v = getattr(self, k)
            if v is not None and (not _is_real(v) or not 0.0 < v < 1.0):
                raise RuntimeInputError(f"{k}={v!r} must be between 0 and 1 (exclusive)")
        if self.refiner_strength is not None and (
            not _is_real(self.refiner_strength) or not 0.0 < self.refiner_strength <= 1.0
        ):
            raise RuntimeInputError(f"refiner_strength={self.refiner_strength!r} must be in (0, 1]")
        if self.high_noise_frac is not None and self.refiner_strength is not None:
            raise RuntimeInputError("choose one of high_noise_frac (ensemble) and refiner_strength (SDEdit)")
        for k in ("aesthetic_score", "negative_aesthetic_score"):
            v = getattr(self, k)
            if not _is_real(v) or not math.isfinite(v):
                raise RuntimeInputError(f"{k}={v!r} must be a finite number")
        for k in ("original_size", "target_size", "negative_original_size", "negative_target_size",
                  "crops_coords_top_left", "negative_crops_coords_top_left"):  # fmt: skip
            pair = _pair(getattr(self, k), k)
            if pair != getattr(self, k):
                fix[k] = pair
        from runtime.vae import check_options  # runtime.vae imports this module

        check_options(self.vae_decoder, self.preview, self.preview_every, self.vae_tiling, self.vae_tile_size)
        for k in ("vae_tile_size", "preview_every"):  # numpy integers -> int (the recorded JSON)
            if getattr(self, k) is not None and type(getattr(self, k)) is not int:
                fix[k] = int(getattr(self, k))
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise RuntimeInputError(f"scheduler={self.scheduler!r} must be a name")
        n = self.deepcache_interval
        if not _is_int(n) or not 1 <= n <= 1000:
            raise RuntimeInputError(f"deepcache_interval={n!r} must be an integer in 1..1000 (1: off)")
        if not _is_int(self.deepcache_branch) or self.deepcache_branch < 0:
            raise RuntimeInputError(f"deepcache_branch={self.deepcache_branch!r} must be a non-negative integer")
        if self.deepcache_schedule not in DEEPCACHE_SCHEDULES:
            raise RuntimeInputError(
                f"deepcache_schedule={self.deepcache_schedule!r}: choose one of {', '.join(DEEPCACHE_SCHEDULES)}"
            )
        c = self.deepcache_center
        if not _is_real(c) or not math.isfinite(c) or c < 0:
            raise RuntimeInputError(f"deepcache_center={c!r} must be a finite non-negative number")
        if not _is_real(self.deepcache_pow) or not 1 < self.deepcache_pow <= 10:
            raise RuntimeInputError(f"deepcache_pow={self.deepcache_pow!r} must be in (1, 10]")
        g = self.guidance_cutoff
        if g is not None and (not _is_real(g) or not 0.0 < g < 1.0):
            raise RuntimeInputError(f"guidance_cutoff={g!r} must be between 0 and 1 (exclusive)")
        if isinstance(self.prompt, tuple):
            fix["prompt"] = list(self.prompt)
        for k in ("height", "width", "num_inference_steps", "num_images_per_prompt", "seed", "clip_skip",
                  "deepcache_interval", "deepcache_branch"):  # fmt: skip
            v = getattr(self, k)
            if v is not None and not isinstance(v, int):
                fix[k] = int(v)
        for k in ("guidance_scale", "guidance_rescale", "strength", "aesthetic_score", "negative_aesthetic_score",
                  "deepcache_center", "deepcache_pow", "guidance_cutoff"):  # fmt: skip
            v = getattr(self, k)
            if v is not None and not isinstance(v, float):
                fix[k] = float(v)
        return dataclasses.replace(self, **fix) if fix else self
