"""What one generation asks for (`GenerationParams`; what a loaded model folder is, `ModelInfo`, is in
runtime.model_info and re-exported here).

Both are frozen and validated once: every other part of the runtime reads typed fields. The parameter
names are diffusers' (StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline.__call__), plus the two of
the base -> refiner hand-off the CLI has always had: `high_noise_frac` (ensemble of experts) and
`refiner_strength` (SDEdit refinement).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import RuntimeInputError
from runtime.model_info import ModelInfo, _is_int, _is_real, read_json, regular_file  # noqa: F401 - re-exported

OUTPUT_TYPES = ("np", "pil", "latent")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed
MAX_SIDE = 16384  # pixels: an absolute cap on height and width, before any memory estimate
# batch: diffusers' noise, one draw for the whole batch (image i needs the batch to be made again);
# per-image: A1111's, image i of the batch is the single-image generation with seed + i
SEED_MODES = ("batch", "per-image")
DEEPCACHE_SCHEDULES = ("uniform", "quadratic")  # runtime.deepcache.full_steps


# -- one generation ---------------------------------------------------------------------------------------------
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
    prompt_syntax: str = "plain"  # plain | compel | a1111: weights and long prompts (runtime.prompts)
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
    strength: float | None = None  # None: 0.3 (img2img), or diffusers' inpainting default 0.9999 with a mask_image
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
    # inpainting and outpainting (runtime.inpaint): white = repaint; padding_mask_crop: pixels of margin around the
    # mask's box, inpainted at full size and pasted back; mask_blur: diffusers' mask_processor.blur(mask, blur)
    mask_image: Any = None
    padding_mask_crop: int | None = None
    mask_blur: float | None = None

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
        skip = ("latents", "image", "mask_image", "preview", "preview_every")  # previews do not change the image
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
        from runtime.prompts import check_prompts  # the syntax and every prompt in it: one line each

        check_prompts(self)
        from runtime.inpaint import check_options as check_inpaint  # strength's default, the mask's options

        fix |= check_inpaint(self)
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
                  "deepcache_interval", "deepcache_branch", "padding_mask_crop"):  # fmt: skip
            v = getattr(self, k)
            if v is not None and not isinstance(v, int):
                fix[k] = int(v)
        for k in ("guidance_scale", "guidance_rescale", "strength", "aesthetic_score", "negative_aesthetic_score",
                  "deepcache_center", "deepcache_pow", "guidance_cutoff", "mask_blur"):  # fmt: skip
            v = fix.get(k, getattr(self, k))
            if v is not None and not isinstance(v, float):
                fix[k] = float(v)
        return dataclasses.replace(self, **fix) if fix else self
