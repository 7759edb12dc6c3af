"""DDIM (eta = 0): deterministic steps between integer train timesteps, in alphas_cumprod space."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .base import Noise, Schedule, Scheduler, StepState
from .common import F32, ONE, add_noise_at_timestep, spaced_timesteps
from .prediction import Denoiser

# ref: diffusers DDIMScheduler.__init__ defaults
DDIM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


def check_alpha_space(cfg: dict) -> list[tuple[str, object, str]]:
    """Checks shared by DDIM and LCM."""
    bad = []
    if cfg.get("thresholding"):
        bad.append(("thresholding", cfg["thresholding"], "dynamic thresholding is not implemented"))
    if cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        bad.append(("prediction_type", cfg["prediction_type"], "expected epsilon, v_prediction or sample"))
    return bad


def clip_x0(cfg: dict, x0: np.ndarray) -> np.ndarray:
    if not cfg.get("clip_sample"):
        return x0
    r = F32(cfg["clip_sample_range"])
    return np.clip(x0, -r, r)


class DDIM(Scheduler):
    """DDIMScheduler with eta = 0 (the SDXL pipelines' default)."""

    name = "ddim"
    class_name = "DDIMScheduler"
    terminal_fix = False  # DDIM keeps alphas_cumprod[-1] = 0 under rescale_betas_zero_snr

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.final_alpha_cumprod = ONE if config["set_alpha_to_one"] else self.alphas_cumprod[0]

    # ref: diffusers DDIMScheduler.set_timesteps
    def schedule(self, n: int) -> Schedule:
        cfg = self.config
        t = spaced_timesteps(cfg["timestep_spacing"], n, self.num_train_timesteps, cfg["steps_offset"])
        t = t.round() if cfg["timestep_spacing"] == "linspace" else t
        return Schedule(timesteps=t.astype(np.int64).astype(F32), sigmas=None, num_inference_steps=n)

    # ref: diffusers DDIMScheduler.add_noise (at the timestep value)
    def add_noise(self, schedule: Schedule, index: int, x: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_at_timestep(self.alphas_cumprod, schedule.timesteps[index], x, noise)

    def sample(
        self, schedule: Schedule, begin: int, end: int, x: np.ndarray, denoise: Denoiser, noise: Noise
    ) -> Iterator[StepState]:
        """DDIM, eta 0. ref: diffusers DDIMScheduler.step"""
        # the previous timestep is t - T // n whatever the spacing (not the next entry of the schedule)
        stride = self.num_train_timesteps // schedule.num_inference_steps
        for i, k in enumerate(range(begin, end)):
            t = schedule.timesteps[k]
            prev = int(t) - stride
            alpha_prod = self.alphas_cumprod[int(t)]
            alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
            x0, eps = denoise.vp(x, t, np.sqrt(alpha_prod), np.sqrt(ONE - alpha_prod))
            x0 = clip_x0(self.config, x0)
            # eta = 0: DDIMScheduler's std_dev_t is 0, its variance term drops out
            x = np.sqrt(alpha_prev) * x0 + np.sqrt(ONE - alpha_prev) * eps
            yield StepState(i, end - begin, t, x, x0)
