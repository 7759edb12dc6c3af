"""What a loaded model folder is (`ModelInfo`): its configs read and validated once (regular files of bounded size,
JSON objects, sizes, latents statistics, scheduler values), then typed fields for the rest of the runtime."""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import RuntimeInputError

MAX_CONFIG_BYTES = 1 << 20  # a diffusers config is a few KB: anything larger is not one
LCM_NAMES = ("lcm", "lcmscheduler")
MAX_TRAIN_TIMESTEPS = 100_000  # SDXL's schedulers have 1000; the sigma tables are this long


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
        if in_channels not in (latent_channels, 2 * latent_channels + 1):  # 2c + 1: inpainting
            raise RuntimeInputError(
                f"{unet_path}: in_channels={in_channels} but the VAE has {latent_channels} (an inpainting UNet has "
                f"{2 * latent_channels + 1})"
            )
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

    def memory_estimate(self, height: int, width: int, batch: int = 1, cfg: bool = True, **vae) -> dict[str, int]:
        """runtime.memory.estimate for this folder (vae: its vae_decoder and tiles)."""
        from runtime import memory

        return memory.estimate(self, height, width, batch, cfg, **vae)

    def check_memory(self, height: int, width: int, batch: int = 1, cfg: bool = True, limit: float | None = None,
                     **vae):  # fmt: skip
        """Refuse (RuntimeInputError) a size whose memory estimate exceeds `limit` bytes (runtime.memory.check;
        vae: the generation's vae_decoder, vae_tiling and vae_tile_size)."""
        from runtime import memory

        memory.check(self, height, width, batch, cfg, limit, **vae)

    @property
    def latent_channels(self) -> int:
        return self.vae_config.get("latent_channels", 4)

    @property
    def is_inpainting(self) -> bool:
        """An inpainting UNet (in_channels 9: latents, mask, masked-image latents; runtime.inpaint)."""
        return self.in_channels == 2 * self.latent_channels + 1

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
