"""Noise schedules as data: betas, alphas_cumprod, timestep spacings, sigma conversions (float32).

diffusers builds these tables with torch float32 ops; the helpers below follow them op for op in numpy
(torch.linspace evaluates `start + step * i` with a fused multiply-add, torch.cumprod accumulates in double).
The one op we cannot copy is torch's CPU float32 sqrt (MKL VML, not correctly rounded): numpy's correctly
rounded sqrt differs from it by 1 ulp for about 1 value in 5.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
ONE = F32(1.0)


def log32(x: np.float32) -> np.float32:
    """float32 log of a scalar, rounded from double (torch's scalar log agrees to within 1 ulp)."""
    with np.errstate(divide="ignore"):
        return F32(np.log(np.float64(x)))


def exp32(x: np.float32) -> np.float32:
    return F32(np.exp(np.float64(x)))


# ref: torch aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp linspace_kernel (float32, fma-contracted)
def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    a, b = F32(start), F32(end)
    if steps == 1:
        return np.array([a], dtype=F32)
    step = (b - a) / F32(steps - 1)  # float32 step, as torch computes it
    i = np.arange(steps, dtype=np.float64)
    # fma(step, i, a) rounds once: step * i is exact in double, so the double sum rounds once more at most
    low = (np.float64(a) + np.float64(step) * i).astype(F32)
    high = (np.float64(b) - np.float64(step) * (steps - 1 - i)).astype(F32)
    return np.where(i < steps // 2, low, high)


# ref: diffusers schedulers betas_for_alpha_bar (cosine, max_beta 0.999)
def _betas_cosine(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float64).astype(F32)


# ref: diffusers schedulers rescale_zero_terminal_snr (float32 torch ops)
def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    root = np.sqrt(cumprod_f32(ONE - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_bar = root * root
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return ONE - alphas


# ref: torch.cumprod on CPU (accumulates float32 inputs in double, stores each product as float32)
def cumprod_f32(x: np.ndarray) -> np.ndarray:
    return np.cumprod(x.astype(np.float64)).astype(F32)


# ref: diffusers EulerDiscreteScheduler.__init__ (betas .. alphas_cumprod; same in every scheduler here)
def make_alphas_cumprod(cfg: dict, terminal_fix: bool) -> np.ndarray:
    """alphas_cumprod [num_train_timesteps] float32; terminal_fix: Euler/DPM set the last one to 2**-24."""
    n = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64).astype(F32)
        if len(betas) != n:
            raise ValueError(f"trained_betas has {len(betas)} entries but num_train_timesteps is {n}")
    elif cfg["beta_schedule"] == "linear":
        betas = torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        root = torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)
        betas = root * root
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = _betas_cosine(n)
    else:  # checked in config.py; kept for direct callers
        raise ValueError(f"beta_schedule={cfg['beta_schedule']!r} is not supported")
    if cfg.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = cumprod_f32(ONE - betas)
    if cfg.get("rescale_betas_zero_snr") and terminal_fix:
        alphas_cumprod[-1] = F32(2.0**-24)
    return alphas_cumprod


# ref: diffusers EulerDiscreteScheduler.set_timesteps (`((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`)
def add_noise_at_timestep(alphas_cumprod: np.ndarray, t: float, x: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """sqrt(a_t) x + sqrt(1 - a_t) noise at the timestep's value.
    # ref: diffusers DDIMScheduler.add_noise, LCMScheduler.add_noise"""
    alpha_prod = alphas_cumprod[int(t)]
    return np.sqrt(alpha_prod) * x + np.sqrt(ONE - alpha_prod) * noise


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma(t) = sqrt((1 - alphas_cumprod) / alphas_cumprod) [num_train_timesteps] float32, ascending in t."""
    return np.sqrt((ONE - alphas_cumprod) / alphas_cumprod)


# ref: diffusers EulerDiscreteScheduler.set_timesteps / DDIMScheduler.set_timesteps (timestep_spacing branch)
def spaced_timesteps(spacing: str, n: int, num_train: int, steps_offset: int) -> np.ndarray:
    """Timesteps (float64, descending) of Euler / Euler ancestral / DDIM for n steps."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // n
        return (np.arange(0, n) * ratio).round()[::-1] + steps_offset
    if spacing == "trailing":
        return np.arange(num_train, 0, -num_train / n).round() - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported")


# ref: diffusers DPMSolverMultistepScheduler.set_timesteps (n + 1 points with the last dropped)
def dpm_timesteps(spacing: str, n: int, num_train: int, steps_offset: int) -> np.ndarray:
    """DPM-Solver timesteps (int64, descending) for n steps (lambda_min_clipped = -inf)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = num_train // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(num_train, 0, -num_train / n).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported")


# ref: diffusers EulerDiscreteScheduler._sigma_to_t (vectorised; same float64/float32 mix)
def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timestep of each sigma by linear interpolation in log-sigma; log_sigmas ascending."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))  # [S]
    below = log_sigmas[:, None] <= log_sigma[None, :]  # [T, S]
    last_below = len(log_sigmas) - 1 - np.argmax(below[::-1], axis=0)
    low_idx = np.where(below.any(axis=0), last_below, 0).clip(max=len(log_sigmas) - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]  # float32
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * (low_idx + 1)


# ref: diffusers EulerDiscreteScheduler._convert_to_karras (rho = 7)
def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
