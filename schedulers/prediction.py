"""The model as a denoiser: one call of the model and its output turned into the predicted clean sample x0.

Every sampler sees the model through this boundary, so the prediction-type conversion (epsilon, v_prediction,
sample) is written once. diffusers' schedulers compute x0 in two parametrizations, kept here as two methods so
that each sampler's float32 arithmetic stays diffusers' own (the parity tests hold them to 1e-5):
- variance exploding, x = x0 + sigma * eps (the Euler family, k-diffusion's form): the model sees
  x * c_in with c_in = 1 / sqrt(sigma^2 + 1), x0 = c_skip * x + c_out * out;
- variance preserving, x = alpha * x0 + sigma * eps (DDIM, LCM, DPM-Solver), the model sees x as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .common import F32, ONE

Model = Callable[[np.ndarray, np.float32], np.ndarray]  # (scaled latents, timestep) -> model output


class Denoiser:
    def __init__(self, model: Model, prediction_type: str):
        self.model, self.prediction_type = model, prediction_type

    def __call__(self, x: np.ndarray, t: np.float32) -> np.ndarray:
        """The raw model output, float32."""
        return np.asarray(self.model(x, t), dtype=F32)

    # ref: diffusers EulerDiscreteScheduler.scale_model_input + step (pred_original_sample by prediction_type)
    def ve(self, x: np.ndarray, t: np.float32, sigma: np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(x0, model output) for x = x0 + sigma * eps."""
        out = self(x / np.sqrt(sigma * sigma + ONE), t)
        if self.prediction_type == "epsilon":
            return x - sigma * out, out
        if self.prediction_type == "v_prediction":
            return out * (-sigma / np.sqrt(sigma * sigma + ONE)) + x / (sigma * sigma + ONE), out
        return out, out  # sample

    # ref: diffusers DDIMScheduler.step / LCMScheduler.step (pred_original_sample, pred_epsilon) and
    # DPMSolverMultistepScheduler.convert_model_output (dpmsolver++): the same expressions
    def vp(self, x: np.ndarray, t: np.float32, alpha: np.float32, sigma: np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(x0, eps) for x = alpha * x0 + sigma * eps."""
        out = self(x, t)
        if self.prediction_type == "epsilon":
            return (x - sigma * out) / alpha, out
        if self.prediction_type == "sample":
            return out, (x - alpha * out) / sigma
        return alpha * x - sigma * out, alpha * out + sigma * x  # v_prediction
