"""schedulers/ API: torch-free import, names, config checks, bad input (no diffusers needed)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from schedulers import SCHEDULER_HELP, SCHEDULER_NAMES, create_scheduler, resolve_name

PACKAGE = Path(__file__).resolve().parent.parent / "schedulers"
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
CLASS_NAMES = [
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DDIMScheduler",
    "LCMScheduler",
]


def test_import_loads_neither_torch_nor_diffusers():
    code = (
        "import sys, schedulers; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sources_import_only_numpy_and_stdlib():
    allowed = {"numpy", "__future__", "collections", "dataclasses", "math"}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            assert {n.split(".")[0] for n in names} <= allowed, f"{path.name}: {names}"


def test_names_and_help():
    assert SCHEDULER_NAMES == ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "lcm")
    for name in (*SCHEDULER_NAMES, *CLASS_NAMES):
        assert create_scheduler(SDXL, name).plan(4).timesteps.dtype == np.float32
    assert all(name in SCHEDULER_HELP for name in SCHEDULER_NAMES)
    assert create_scheduler(SDXL).name == "euler"  # the config's _class_name
    assert create_scheduler(SDXL, "dpmpp_2m_karras").name == "dpmpp_2m_karras"
    assert create_scheduler({**SDXL, "use_karras_sigmas": True}, "DPMSolverMultistepScheduler").name == (
        "dpmpp_2m_karras"
    )
    assert resolve_name("DPMPP-2M") == resolve_name("dpmpp_2m")


def test_short_dpm_names_fix_karras_either_way():
    karras = {**SDXL, "use_karras_sigmas": True}
    plain = create_scheduler(karras, "dpmpp_2m").plan(4).timesteps
    assert plain.tolist() == create_scheduler(SDXL, "dpmpp_2m").plan(4).timesteps.tolist()
    assert plain.tolist() != create_scheduler(SDXL, "dpmpp_2m_karras").plan(4).timesteps.tolist()


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="'heun'") as err:
        create_scheduler(SDXL, "heun")
    assert all(name in str(err.value) for name in (*SCHEDULER_NAMES, *CLASS_NAMES))


def test_config_without_class_name_needs_a_name():
    config = {k: v for k, v in SDXL.items() if k != "_class_name"}
    with pytest.raises(ValueError, match="_class_name"):
        create_scheduler(config)
    assert create_scheduler(config, "ddim").name == "ddim"


@pytest.mark.parametrize("steps", [0, -3, 2.5, "7", None])
def test_bad_step_count(steps):
    with pytest.raises(ValueError, match=f"num_inference_steps.*{steps!r}"):
        create_scheduler(SDXL).plan(steps)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_more_steps_than_train_timesteps(name):
    with pytest.raises(ValueError, match="1001"):
        create_scheduler(SDXL, name).plan(1001)


def test_lcm_steps_beyond_original_inference_steps():
    with pytest.raises(ValueError, match="num_inference_steps=51.*original_inference_steps=50"):
        create_scheduler(SDXL, "lcm").plan(51)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5"])
def test_strength_outside_unit_interval(strength):
    with pytest.raises(ValueError, match=f"strength.*{strength!r}"):
        create_scheduler(SDXL).plan(20, strength=strength)


@pytest.mark.parametrize("key", ["denoising_start", "denoising_end"])
@pytest.mark.parametrize("value", [0.0, 1.0, 1.2])
def test_denoising_fraction_outside_open_interval(key, value):
    with pytest.raises(ValueError, match=f"{key}.*{value}"):
        create_scheduler(SDXL).plan(20, **{key: value})


def test_denoising_start_after_end():
    with pytest.raises(ValueError, match="denoising_start=0.8.*denoising_end=0.5"):
        create_scheduler(SDXL).plan(20, denoising_start=0.8, denoising_end=0.5)


def test_cut_that_leaves_no_step():
    with pytest.raises(ValueError, match="no denoising step"):
        create_scheduler(SDXL).plan(4, strength=0.1)  # int(4 * 0.1) = 0 steps


UNSUPPORTED = [
    ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("euler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, "timestep_type"),
    ("euler", {"interpolation_type": "cubic"}, "interpolation_type"),
    ("euler", {"final_sigmas_type": "one"}, "final_sigmas_type"),
    ("euler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("euler", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("euler", {"beta_schedule": "sigmoid"}, "beta_schedule"),
    ("euler_a", {"prediction_type": "sample"}, "prediction_type"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order"),
    ("dpmpp_2m", {"thresholding": True}, "thresholding"),
    ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("dpmpp_2m", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("dpmpp_2m", {"lambda_min_clipped": -5.1}, "lambda_min_clipped"),
    ("dpmpp_2m", {"variance_type": "learned_range"}, "variance_type"),
    ("ddim", {"thresholding": True}, "thresholding"),
    ("ddim", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("lcm", {"thresholding": True}, "thresholding"),
    ("lcm", {"num_train_timesteps": 0}, "num_train_timesteps"),
]


@pytest.mark.parametrize("name, changes, key", UNSUPPORTED, ids=[f"{u[0]}-{u[2]}" for u in UNSUPPORTED])
def test_unsupported_setting_names_key_and_value(name, changes, key):
    with pytest.raises(ValueError, match=re.escape(f"{key}={changes[key]!r}")):
        create_scheduler({**SDXL, **changes}, name)


IGNORED = [
    ("euler_a", {"use_karras_sigmas": True, "interpolation_type": "log_linear"}),  # not read by the class
    ("lcm", {"timestep_spacing": "bogus", "steps_offset": "x"}),  # LCM takes them but never reads them
    ("dpmpp_2m", {"use_dynamic_shifting": True, "flow_shift": 3.0}),  # only with a mu / flow sigmas
    ("ddim", {"use_karras_sigmas": True, "thresholding": False}),
    ("euler", {"clip_sample": True, "skip_prk_steps": True, "foo": 1}),
]


@pytest.mark.parametrize("name, changes", IGNORED, ids=[i[0] for i in IGNORED])
def test_keys_the_class_ignores_are_ignored(name, changes):
    reference = create_scheduler(SDXL, name).plan(8)
    plan = create_scheduler({**SDXL, **changes}, name).plan(8)
    assert plan.timesteps.tolist() == reference.timesteps.tolist()


def test_stochastic_sampler_needs_noise_and_deterministic_ones_do_not():
    x = np.zeros((1, 4, 8, 6), dtype=np.float64)

    def model(x_in, t):
        return 0.5 * x_in

    for name in SCHEDULER_NAMES:
        plan = create_scheduler(SDXL, name).plan(3)
        if plan.stochastic:
            with pytest.raises(ValueError, match="noise"):
                list(plan.sample(x, model))
        else:
            states = list(plan.sample(x, model))
            assert [s.index for s in states] == [0, 1, 2]
            assert all(s.latents.dtype == np.float32 for s in states)


def test_plan_views():
    plan = create_scheduler(SDXL).plan(10, strength=0.5, denoising_end=0.8)  # 901 .. 1, cut at t >= 200
    assert plan.begin_index == 5 and plan.end_index == 8
    assert plan.timesteps.tolist() == [401.0, 301.0, 201.0]
    assert len(plan.sigmas) == len(plan.timesteps) + 1
    assert plan.add_noise(np.zeros((1, 4, 2, 2)), np.ones((1, 4, 2, 2))).dtype == np.float32
