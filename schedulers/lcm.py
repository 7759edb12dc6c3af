"""LCM: consistency-model steps (boundary-scaled x0, then re-noised to the next timestep)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .base import Noise, Schedule, Scheduler, StepState
from .common import F32, ONE, add_noise_at_timestep
from .ddim import clip_x0
from .prediction import Denoiser

# ref: diffusers LCMScheduler.__init__ defaults
LCM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}

SIGMA_DATA = F32(0.5)


# ref: diffusers LCMScheduler.get_scalings_for_boundary_condition_discrete (float32 at an int64 timestep)
def boundary_scalings(t: np.float32, timestep_scaling: float) -> tuple[np.float32, np.float32]:
    """(c_skip, c_out): denoised = c_out * x0 + c_skip * x."""
    scaled = F32(t) * F32(timestep_scaling)
    c_skip = ONE / (scaled * scaled + SIGMA_DATA * SIGMA_DATA) * (SIGMA_DATA * SIGMA_DATA)
    c_out = scaled / np.sqrt(scaled * scaled + SIGMA_DATA * SIGMA_DATA)
    return c_skip, c_out


class LCM(Scheduler):
    """LCMScheduler (num_inference_steps path, strength 1: the SDXL pipelines cut the schedule afterwards)."""

    name = "lcm"
    class_name = "LCMScheduler"
    stochastic = True
    terminal_fix = False

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.final_alpha_cumprod = ONE if config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.original_steps = int(config["original_inference_steps"])

    # ref: diffusers LCMScheduler.set_timesteps (its ValueErrors, in the same order)
    def check_steps(self, n: int) -> None:
        origin = self.original_steps
        if origin > self.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps={origin} is more than num_train_timesteps={self.num_train_timesteps}"
            )
        if n > origin:
            raise ValueError(
                f"num_inference_steps={n} is more than original_inference_steps={origin}: LCM picks its steps "
                f"from the {origin}-step distillation schedule"
            )

    # ref: diffusers LCMScheduler.set_timesteps
    def schedule(self, n: int) -> Schedule:
        k = self.num_train_timesteps // self.original_steps
        origin = (np.arange(1, self.original_steps + 1) * k - 1)[::-1]  # the distillation schedule, descending
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        return Schedule(timesteps=origin[picks].astype(F32), sigmas=None, num_inference_steps=n)

    # ref: diffusers LCMScheduler.add_noise (at the timestep value)
    def add_noise(self, schedule: Schedule, index: int, x: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return add_noise_at_timestep(self.alphas_cumprod, schedule.timesteps[index], x, noise)

    def sample(
        self, schedule: Schedule, begin: int, end: int, x: np.ndarray, denoise: Denoiser, noise: Noise
    ) -> Iterator[StepState]:
        """Multistep consistency sampling. ref: diffusers LCMScheduler.step"""
        ts, n = schedule.timesteps, schedule.num_inference_steps
        for i, k in enumerate(range(begin, end)):
            t = ts[k]
            t_next = ts[k + 1] if k + 1 < len(ts) else t
            alpha_prod = self.alphas_cumprod[int(t)]
            alpha_next = self.alphas_cumprod[int(t_next)] if t_next >= 0 else self.final_alpha_cumprod
            x0, _ = denoise.vp(x, t, np.sqrt(alpha_prod), np.sqrt(ONE - alpha_prod))
            x0 = clip_x0(self.config, x0)
            c_skip, c_out = boundary_scalings(t, self.config["timestep_scaling"])
            denoised = c_out * x0 + c_skip * x
            if k != n - 1:  # every step but the schedule's last re-noises (a denoising_end cut included)
                z = np.asarray(noise(denoised.shape), dtype=F32)
                x = np.sqrt(alpha_next) * denoised + np.sqrt(ONE - alpha_next) * z
            else:
                x = denoised
            yield StepState(i, end - begin, t, x, denoised)
