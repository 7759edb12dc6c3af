"""Euler and Euler ancestral (k-diffusion samplers on the discrete SD sigma schedule)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .base import Noise, Schedule, Scheduler, StepState
from .common import (
    F32,
    ONE,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    torch_linspace_f32,
    train_sigmas,
)
from .prediction import Denoiser

# ref: diffusers EulerDiscreteScheduler.__init__ defaults
EULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}

# ref: diffusers EulerAncestralDiscreteScheduler.__init__ defaults
EULER_A_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


def check_euler(cfg: dict) -> list[tuple[str, object, str]]:
    """(key, value, why) for every honoured setting we do not implement."""
    bad = [(k, cfg[k], "not implemented") for k in ("use_exponential_sigmas", "use_beta_sigmas") if cfg.get(k)]
    if cfg["timestep_type"] not in ("discrete", "continuous"):
        bad.append(("timestep_type", cfg["timestep_type"], "expected 'discrete' or 'continuous'"))
    elif cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
        bad.append(("timestep_type", "continuous", "with v_prediction is not implemented"))
    if cfg["interpolation_type"] not in ("linear", "log_linear"):
        bad.append(("interpolation_type", cfg["interpolation_type"], "expected 'linear' or 'log_linear'"))
    if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        bad.append(("final_sigmas_type", cfg["final_sigmas_type"], "expected 'zero' or 'sigma_min'"))
    if cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample", "original_sample"):
        bad.append(("prediction_type", cfg["prediction_type"], "expected epsilon, v_prediction or sample"))
    return bad


def check_euler_a(cfg: dict) -> list[tuple[str, object, str]]:
    if cfg["prediction_type"] not in ("epsilon", "v_prediction"):
        return [("prediction_type", cfg["prediction_type"], "Euler ancestral supports epsilon, v_prediction")]
    return []


class Euler(Scheduler):
    """EulerDiscreteScheduler: first-order Euler steps in sigma space."""

    name = "euler"
    class_name = "EulerDiscreteScheduler"

    # ref: diffusers EulerDiscreteScheduler.set_timesteps (num_inference_steps path)
    def schedule(self, n: int) -> Schedule:
        cfg = self.config
        timesteps = spaced_timesteps(cfg["timestep_spacing"], n, self.num_train_timesteps, cfg["steps_offset"]).astype(
            F32
        )
        table = train_sigmas(self.alphas_cumprod)  # [T] float32
        log_table = np.log(table)
        if cfg.get("interpolation_type", "linear") == "log_linear":
            # n + 1 log-spaced sigmas from sigma(T-1) to sigma(0), so the schedule keeps n + 2 entries
            sigmas = np.exp(torch_linspace_f32(np.log(table[-1]), np.log(table[0]), n + 1).astype(np.float64))
            sigmas = sigmas.astype(F32)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        if cfg.get("use_karras_sigmas"):
            lo = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else float(sigmas[-1])
            hi = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else float(sigmas[0])
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = sigma_to_t(sigmas, log_table).astype(F32)
        last = np.sqrt((ONE - self.alphas_cumprod[0]) / self.alphas_cumprod[0])
        last = last if cfg.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        return Schedule(timesteps=timesteps, sigmas=sigmas, num_inference_steps=n)

    # ref: diffusers EulerDiscreteScheduler.init_noise_sigma
    def init_noise_sigma(self, schedule: Schedule) -> float:
        top = schedule.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(top)
        return float(np.sqrt(top * top + ONE))

    # ref: diffusers EulerDiscreteScheduler.add_noise (at begin_index)
    def add_noise(self, schedule: Schedule, index: int, x: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return x + noise * schedule.sigmas[index]

    def sample(
        self, schedule: Schedule, begin: int, end: int, x: np.ndarray, denoise: Denoiser, noise: Noise
    ) -> Iterator[StepState]:
        """Euler: x += (x - x0) / sigma * (sigma_next - sigma). ref: diffusers EulerDiscreteScheduler.step"""
        sigmas = schedule.sigmas
        for i, k in enumerate(range(begin, end)):
            t, s = schedule.timesteps[k], sigmas[k]
            x0, _ = denoise.ve(x, t, s)
            x = x + (x - x0) / s * (sigmas[k + 1] - s)
            yield StepState(i, end - begin, t, x, x0)


class EulerAncestral(Euler):
    """EulerAncestralDiscreteScheduler: Euler to sigma_down, then fresh noise up to sigma_next."""

    name = "euler_a"
    class_name = "EulerAncestralDiscreteScheduler"
    stochastic = True

    # ref: diffusers EulerAncestralDiscreteScheduler.set_timesteps (linear interpolation, final sigma 0)
    def schedule(self, n: int) -> Schedule:
        timesteps = spaced_timesteps(
            self.config["timestep_spacing"], n, self.num_train_timesteps, self.config["steps_offset"]
        ).astype(F32)
        table = train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        return Schedule(timesteps=timesteps, sigmas=sigmas, num_inference_steps=n)

    def sample(
        self, schedule: Schedule, begin: int, end: int, x: np.ndarray, denoise: Denoiser, noise: Noise
    ) -> Iterator[StepState]:
        """Euler ancestral (eta 1). ref: diffusers EulerAncestralDiscreteScheduler.step"""
        sigmas = schedule.sigmas
        for i, k in enumerate(range(begin, end)):
            t, s, s_next = schedule.timesteps[k], sigmas[k], sigmas[k + 1]
            x0, out = denoise.ve(x, t, s)
            with np.errstate(invalid="ignore"):
                s_up = np.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
                s_down = np.sqrt(s_next * s_next - s_up * s_up)
            x = x + (x - x0) / s * (s_down - s)
            x = x + np.asarray(noise(out.shape), dtype=F32) * s_up  # drawn at every step, the last included
            yield StepState(i, end - begin, t, x, x0)
