"""numpy-only diffusers schedulers (imports numpy and the standard library only).

sched = create_scheduler(scheduler_config, name=None)  # name: SCHEDULER_NAMES or a diffusers class name
plan = sched.plan(num_inference_steps, strength=None, denoising_start=None, denoising_end=None)
latents = noise * plan.init_noise_sigma            # text2img; img2img: plan.add_noise(image_latents, noise)
for state in plan.sample(latents, model, noise):   # model(x_in, t) -> output in the config's prediction_type
    ...                                            # state.index, .timestep, .latents, .denoised
"""

from .base import Plan, Schedule, Scheduler, StepState
from .config import SCHEDULER_HELP, SCHEDULER_NAMES, create_scheduler, resolve_name

__all__ = [
    "SCHEDULER_HELP",
    "SCHEDULER_NAMES",
    "Plan",
    "Schedule",
    "Scheduler",
    "StepState",
    "create_scheduler",
    "resolve_name",
]
