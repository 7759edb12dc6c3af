"""What every scheduler shares: the schedule as data, the plan (which steps run), the per-step state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .common import F32, make_alphas_cumprod
from .prediction import Denoiser, Model

Noise = Callable[[tuple[int, ...]], np.ndarray]  # shape -> standard normal float32


@dataclass(frozen=True)
class Schedule:
    """The full schedule, as diffusers' scheduler holds it after set_timesteps(num_inference_steps)."""

    timesteps: np.ndarray  # [M] float32 (diffusers' int64 ones are exact in float32)
    sigmas: np.ndarray | None  # [M + 1] float32 for sigma-space schedulers (Euler, DPM); None for DDIM, LCM
    num_inference_steps: int  # as requested; M can differ (trailing spacing with some step counts)


@dataclass(frozen=True)
class StepState:
    index: int  # 0 .. len(plan.timesteps) - 1, the pipeline's `i`
    total: int  # steps in the run (len(plan.timesteps))
    timestep: np.float32  # the value the model was called with
    latents: np.ndarray  # after this step
    denoised: np.ndarray | None  # the predicted x0 (LCM: its boundary-scaled `denoised`)


@dataclass(frozen=True)
class Plan:
    """The steps one pipeline call runs: schedule[begin_index:end_index]."""

    scheduler: Scheduler
    schedule: Schedule
    begin_index: int
    end_index: int
    init_noise_sigma: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_noise_sigma", self.scheduler.init_noise_sigma(self.schedule))

    @property
    def timesteps(self) -> np.ndarray:
        return self.schedule.timesteps[self.begin_index : self.end_index]

    @property
    def sigmas(self) -> np.ndarray | None:
        s = self.schedule.sigmas
        return None if s is None else s[self.begin_index : self.end_index + 1]

    @property
    def stochastic(self) -> bool:
        """True when sample() draws step noise (Euler ancestral, LCM)."""
        return self.scheduler.stochastic

    def add_noise(self, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """img2img: noise the encoded image to the first kept step (scheduler.add_noise at timesteps[:1])."""
        original = np.asarray(original, dtype=F32)
        return self.scheduler.add_noise(self.schedule, self.begin_index, original, np.asarray(noise, F32))

    def sample(self, latents: np.ndarray, model: Model, noise: Noise | None = None) -> Iterator[StepState]:
        """The denoising loop; yields the state after each step."""
        x = np.asarray(latents, dtype=F32)
        draw = noise if noise is not None else _no_noise(self.scheduler.name)
        denoiser = Denoiser(model, self.scheduler.prediction_type)
        return self.scheduler.sample(self.schedule, self.begin_index, self.end_index, x, denoiser, draw)


def _no_noise(name: str) -> Noise:
    def draw(shape: tuple[int, ...]) -> np.ndarray:
        raise ValueError(f"scheduler {name!r} draws step noise: pass noise=callable(shape) to Plan.sample")

    return draw


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class Scheduler:
    """A diffusers scheduler as data + samplers. Subclasses fill in schedule, sampling and noising."""

    name = ""  # canonical short name (SCHEDULER_NAMES)
    class_name = ""  # the diffusers class it reproduces
    stochastic = False
    terminal_fix = True  # Euler/DPM clamp alphas_cumprod[-1] to 2**-24 under rescale_betas_zero_snr

    def __init__(self, config: dict) -> None:
        self.config = dict(config)
        self.num_train_timesteps = int(config["num_train_timesteps"])
        self.prediction_type = config["prediction_type"]
        self.alphas_cumprod = make_alphas_cumprod(config, self.terminal_fix)  # [T] float32

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # --- to implement -------------------------------------------------------------------------------------
    def schedule(self, n: int) -> Schedule:
        raise NotImplementedError

    def init_noise_sigma(self, schedule: Schedule) -> float:
        return 1.0

    def add_noise(self, schedule: Schedule, index: int, x: np.ndarray, noise: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sample(
        self, schedule: Schedule, begin: int, end: int, x: np.ndarray, denoise: Denoiser, noise: Noise
    ) -> Iterator[StepState]:
        raise NotImplementedError

    def check_steps(self, n: int) -> None:
        """Scheduler-specific limits on the step count (beyond 1 <= n <= num_train_timesteps)."""

    # --- shared -------------------------------------------------------------------------------------------
    def plan(
        self,
        num_inference_steps: int,
        strength: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
    ) -> Plan:
        """Schedule + the cuts of the SDXL pipelines: img2img strength, base/refiner denoising_end/start.

        strength None and denoising_start None: text2img (start from noise * init_noise_sigma).
        strength: img2img, ref: diffusers StableDiffusionXLImg2ImgPipeline.get_timesteps (no denoising_start).
        denoising_start: refiner half, ref: the same get_timesteps' denoising_start branch (strength ignored).
        denoising_end: base half, ref: StableDiffusionXLPipeline.__call__ "8.1 Apply denoising_end".
        """
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {n!r}")
        n = int(n)
        if n > self.num_train_timesteps:
            raise ValueError(f"num_inference_steps={n} is more than num_train_timesteps={self.num_train_timesteps}")
        self.check_steps(n)
        if strength is not None and not (_is_real(strength) and 0.0 <= strength <= 1.0):
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        for key, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None and not (_is_real(value) and 0.0 < value < 1.0):
                raise ValueError(f"{key} must be in (0, 1) or None, got {value!r}")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start={denoising_start} must be less than denoising_end={denoising_end}")

        schedule = self.schedule(n)
        timesteps = schedule.timesteps
        num_train = self.num_train_timesteps
        begin = 0
        if denoising_start is not None:
            cutoff = int(round(num_train - denoising_start * num_train))
            begin = len(timesteps) - int(np.count_nonzero(timesteps < cutoff))
        elif strength is not None:
            kept = min(int(n * strength), n)
            begin = max(n - kept, 0)
        end = len(timesteps)
        if denoising_end is not None:
            cutoff = int(round(num_train - denoising_end * num_train))
            end = begin + int(np.count_nonzero(timesteps[begin:] >= cutoff))
        if end <= begin:
            raise ValueError(
                f"no denoising step left: num_inference_steps={n}, strength={strength}, "
                f"denoising_start={denoising_start}, denoising_end={denoising_end} select none of the "
                f"{len(timesteps)} timesteps {timesteps[0]:g} .. {timesteps[-1]:g} (diffusers would run an empty "
                "loop); use more steps"
            )
        return Plan(self, schedule, begin, end)
