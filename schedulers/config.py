"""Build a scheduler from a diffusers scheduler_config.json dict, optionally swapped to another one by name.

Swapping follows diffusers' `OtherScheduler.from_config(config)`: keys the target class takes are used,
missing ones get the target class's defaults, keys listed in `_use_default_values` are dropped, and keys the
target does not take stay visible (DPM-Solver reads `sigma_min`/`sigma_max` that way) but change nothing.
A key the target honours, set to a value we do not implement, is a ValueError naming key and value.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Scheduler
from .ddim import DDIM, DDIM_DEFAULTS, check_alpha_space
from .dpmsolver import DPM_DEFAULTS, DPMSolverMultistep, check_dpm
from .euler import EULER_A_DEFAULTS, EULER_DEFAULTS, Euler, EulerAncestral, check_euler, check_euler_a
from .lcm import LCM, LCM_DEFAULTS

Check = Callable[[dict], list[tuple[str, object, str]]]

# diffusers class name -> (our class, the diffusers __init__ defaults, extra checks)
CLASSES: dict[str, tuple[type[Scheduler], dict, Check]] = {
    "EulerDiscreteScheduler": (Euler, EULER_DEFAULTS, check_euler),
    "EulerAncestralDiscreteScheduler": (EulerAncestral, EULER_A_DEFAULTS, check_euler_a),
    "DPMSolverMultistepScheduler": (DPMSolverMultistep, DPM_DEFAULTS, check_dpm),
    "DDIMScheduler": (DDIM, DDIM_DEFAULTS, check_alpha_space),
    "LCMScheduler": (LCM, LCM_DEFAULTS, check_alpha_space),
}

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

# short name -> (diffusers class, config overrides the name implies, one-line description)
NAMES: dict[str, tuple[str, dict, str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler (EulerDiscreteScheduler), SDXL's default"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler ancestral: Euler plus fresh noise each step"),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {**_DPMPP_2M, "use_karras_sigmas": False},
        "DPM++ 2M (DPMSolverMultistepScheduler, dpmsolver++, order 2)",
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {**_DPMPP_2M, "use_karras_sigmas": True},
        "DPM++ 2M on Karras sigmas (use_karras_sigmas=True)",
    ),
    "ddim": ("DDIMScheduler", {}, "DDIM, eta 0 (deterministic)"),
    "lcm": ("LCMScheduler", {}, "LCM: for LCM-distilled UNets/LoRAs, 2-8 steps, low guidance"),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(NAMES)
SCHEDULER_HELP: str = "\n".join(f"{name:<16} {desc}" for name, (_, _, desc) in NAMES.items()) + (
    "\n(diffusers class names are accepted too: " + ", ".join(CLASSES) + ")"
)

_SHARED_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
}
_SPACING_IGNORED = {"LCMScheduler"}  # LCM takes timestep_spacing/steps_offset but never reads them


def resolve_name(name: str) -> tuple[str, dict]:
    """A short name or diffusers class name -> (diffusers class name, config overrides)."""
    if name in CLASSES:
        return name, {}
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key in NAMES:
        cls, overrides, _ = NAMES[key]
        return cls, dict(overrides)
    known = ", ".join(SCHEDULER_NAMES) + "; or a class name: " + ", ".join(CLASSES)
    raise ValueError(f"unknown scheduler {name!r}; known: {known}")


def effective_config(config: dict, class_name: str, overrides: dict | None = None) -> dict:
    """The config the diffusers class would see after from_config: its defaults, updated from the dict."""
    _, defaults, _ = CLASSES[class_name]
    dropped = set(config.get("_use_default_values", ()))
    cfg = dict(defaults)
    cfg.update({k: v for k, v in config.items() if k not in dropped and not k.startswith("_")})
    cfg.update(overrides or {})
    cfg["_class_name"] = class_name
    return cfg


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(cfg: dict) -> None:
    """Raise ValueError for a value the chosen class honours but we do not implement."""
    class_name = cfg["_class_name"]
    _, _, family_check = CLASSES[class_name]
    bad = []
    for key, choices in _SHARED_CHOICES.items():
        if key == "beta_schedule" and cfg.get("trained_betas") is not None:
            continue
        if key == "timestep_spacing" and class_name in _SPACING_IGNORED:
            continue
        if cfg[key] not in choices:
            bad.append((key, cfg[key], "expected one of " + ", ".join(choices)))
    if not _is_int(cfg["num_train_timesteps"]) or cfg["num_train_timesteps"] < 1:
        bad.append(("num_train_timesteps", cfg["num_train_timesteps"], "expected a positive integer"))
    if class_name not in _SPACING_IGNORED and not _is_int(cfg["steps_offset"]):
        bad.append(("steps_offset", cfg["steps_offset"], "expected an integer"))
    bad += family_check(cfg)
    if bad:
        lines = "; ".join(f"{k}={v!r} ({why})" for k, v, why in bad)
        raise ValueError(f"{class_name} config not supported: {lines}")


def create_scheduler(config: dict, name: str | None = None) -> Scheduler:
    """A scheduler for a diffusers scheduler config; name (short or class name) swaps the class."""
    if name is None:
        name = config.get("_class_name")
        if name is None:
            raise ValueError("the config has no _class_name: pass a scheduler name, one of " + ", ".join(NAMES))
    class_name, overrides = resolve_name(name)
    cfg = effective_config(config, class_name, overrides)
    check_config(cfg)
    cls, _, _ = CLASSES[class_name]
    scheduler = cls(cfg)
    if class_name == "DPMSolverMultistepScheduler" and cfg.get("use_karras_sigmas"):
        scheduler.name = "dpmpp_2m_karras"
    return scheduler
