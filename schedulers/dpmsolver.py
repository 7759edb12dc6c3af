"""DPM-Solver++ multistep (2M, optionally on Karras sigmas): data-prediction ODE solver in log-SNR time."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .base import Noise, Schedule, Scheduler, StepState
from .common import F32, ONE, dpm_timesteps, exp32, karras_sigmas, log32, sigma_to_t, train_sigmas
from .prediction import Denoiser

# ref: diffusers DPMSolverMultistepScheduler.__init__ defaults
DPM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}


def check_dpm(cfg: dict) -> list[tuple[str, object, str]]:
    """(key, value, why) for every honoured setting we do not implement."""
    bad = []
    if cfg["algorithm_type"] not in ("dpmsolver++", "deis"):  # diffusers maps deis to dpmsolver++
        bad.append(("algorithm_type", cfg["algorithm_type"], "only dpmsolver++ is implemented"))
    if cfg["solver_order"] not in (1, 2):
        bad.append(("solver_order", cfg["solver_order"], "only orders 1 and 2 are implemented"))
    if cfg["solver_type"] not in ("midpoint", "heun", "logrho", "bh1", "bh2"):
        bad.append(("solver_type", cfg["solver_type"], "expected midpoint or heun"))
    if cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        bad.append(("prediction_type", cfg["prediction_type"], "expected epsilon, v_prediction or sample"))
    for key in ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
        if cfg.get(key):
            bad.append((key, cfg[key], "not implemented"))
    if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        bad.append(("final_sigmas_type", cfg["final_sigmas_type"], "expected 'zero' or 'sigma_min'"))
    if cfg["lambda_min_clipped"] is not None and cfg["lambda_min_clipped"] != -float("inf"):
        bad.append(("lambda_min_clipped", cfg["lambda_min_clipped"], "only -inf is implemented"))
    if cfg["variance_type"] is not None and cfg["prediction_type"] == "epsilon":
        bad.append(("variance_type", cfg["variance_type"], "learned variance is not implemented"))
    return bad


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """VP (alpha_t, sigma_t) of a VE sigma. ref: diffusers DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t"""
    alpha = ONE / np.sqrt(sigma * sigma + ONE)
    return alpha, sigma * alpha


def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
    return log32(alpha) - log32(sigma)  # log-SNR / 2; +inf at sigma 0


class DPMSolverMultistep(Scheduler):
    """DPMSolverMultistepScheduler restricted to dpmsolver++ with solver_order <= 2 (DPM++ 2M)."""

    name = "dpmpp_2m"
    class_name = "DPMSolverMultistepScheduler"

    # ref: diffusers DPMSolverMultistepScheduler.set_timesteps (num_inference_steps path)
    def schedule(self, n: int) -> Schedule:
        cfg = self.config
        timesteps = dpm_timesteps(cfg["timestep_spacing"], n, self.num_train_timesteps, cfg["steps_offset"])
        table = train_sigmas(self.alphas_cumprod)  # [T] float32, ascending in t
        if cfg.get("use_karras_sigmas"):
            # sigma_min/sigma_max are read when present in the config (diffusers keeps foreign keys there)
            lo = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else float(table[0])
            hi = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else float(table[-1])
            sigmas = karras_sigmas(lo, hi, n)
            t = sigma_to_t(sigmas, np.log(table))
            timesteps = (t if cfg["beta_schedule"] == "squaredcos_cap_v2" else t.round()).astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
        last = np.sqrt((ONE - self.alphas_cumprod[0]) / self.alphas_cumprod[0])
        last = last if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        return Schedule(timesteps=timesteps.astype(F32), sigmas=sigmas, num_inference_steps=n)

    # ref: diffusers DPMSolverMultistepScheduler.add_noise (at begin_index)
    def add_noise(self, schedule: Schedule, index: int, x: np.ndarray, noise: np.ndarray) -> np.ndarray:
        alpha, sigma = _alpha_sigma(schedule.sigmas[index])
        return alpha * x + sigma * noise

    def sample(
        self, schedule: Schedule, begin: int, end: int, x: np.ndarray, denoise: Denoiser, noise: Noise
    ) -> Iterator[StepState]:
        """DPM-Solver++(2M). ref: diffusers DPMSolverMultistepScheduler.step"""
        cfg, sigmas = self.config, schedule.sigmas
        m = len(schedule.timesteps)  # the whole schedule's length decides the final-step rules
        order = int(cfg["solver_order"])
        heun = cfg["solver_type"] == "heun"
        previous = None  # x0 of the previous step (history starts empty at begin_index)
        for i, k in enumerate(range(begin, end)):
            t = schedule.timesteps[k]
            x0, _ = denoise.vp(x, t, *_alpha_sigma(sigmas[k]))  # scale_model_input is identity
            last_first_order = k == m - 1 and (
                cfg["euler_at_final"] or (cfg["lower_order_final"] and m < 15) or cfg["final_sigmas_type"] == "zero"
            )
            if order == 1 or previous is None or last_first_order:
                x = _first_order(x, x0, sigmas[k], sigmas[k + 1])
            else:
                x = _second_order(x, x0, previous, sigmas[k - 1], sigmas[k], sigmas[k + 1], heun)
            previous = x0
            yield StepState(i, end - begin, t, x, x0)


# ref: diffusers DPMSolverMultistepScheduler.dpm_solver_first_order_update (dpmsolver++)
def _first_order(x: np.ndarray, x0: np.ndarray, s_from: np.float32, s_to: np.float32) -> np.ndarray:
    alpha_t, sigma_t = _alpha_sigma(s_to)
    alpha_s, sigma_s = _alpha_sigma(s_from)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s, sigma_s)
        return (sigma_t / sigma_s) * x - (alpha_t * (exp32(-h) - ONE)) * x0


# ref: diffusers DPMSolverMultistepScheduler.multistep_dpm_solver_second_order_update (dpmsolver++)
def _second_order(
    x: np.ndarray,
    m0: np.ndarray,
    m1: np.ndarray,
    s_prev: np.float32,
    s_from: np.float32,
    s_to: np.float32,
    heun: bool,
) -> np.ndarray:
    alpha_t, sigma_t = _alpha_sigma(s_to)
    alpha_s0, sigma_s0 = _alpha_sigma(s_from)
    alpha_s1, sigma_s1 = _alpha_sigma(s_prev)
    with np.errstate(divide="ignore", invalid="ignore"):
        lambda_t, lambda_s0 = _lambda(alpha_t, sigma_t), _lambda(alpha_s0, sigma_s0)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - _lambda(alpha_s1, sigma_s1)
        r0 = h_0 / h
        d1 = (ONE / r0) * (m0 - m1)
        phi = alpha_t * (exp32(-h) - ONE)
        x = (sigma_t / sigma_s0) * x - phi * m0
        if heun:
            return x + (alpha_t * ((exp32(-h) - ONE) / h + ONE)) * d1
        return x - F32(0.5) * phi * d1
