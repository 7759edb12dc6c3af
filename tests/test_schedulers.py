"""Parity of schedulers/ with diffusers: schedules, text2img loops, img2img and base/refiner cuts."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from schedulers import create_scheduler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' np.array(tensor)
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
logging.getLogger("diffusers").setLevel(logging.ERROR)  # "config attributes ... will be ignored" on swaps

# The "scheduler" entries of shared/configs/*.json (checked below when shared/ is beside the checkout).
# SDXL base 1.0, the refiner, SSD-1B and Segmind Vega all ship this Euler config.
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# latent-consistency/lcm-sdxl and lcm-ssd-1b
LCM = {
    "_class_name": "LCMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
MODEL_CONFIGS = {
    "sdxl-base-1.0": SDXL,
    "sdxl-refiner-1.0": SDXL,
    "ssd-1b": SDXL,
    "segmind-vega": SDXL,
    "lcm-sdxl": LCM,
    "lcm-ssd-1b": LCM,
}
SHARED_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "configs"  # shared/ beside the checkout

_DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
# our name -> (diffusers class, the from_config overrides the name stands for)
DIFFUSERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {**_DPM, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {**_DPM, "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}

ZSNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
COSINE = {"beta_schedule": "squaredcos_cap_v2"}
TRAINED = {"trained_betas": (np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2 * 1.1).tolist()}

# (id, scheduler name or None for the config's class, base config, config changes)
VARIANTS = [(model, None, cfg, {}) for model, cfg in MODEL_CONFIGS.items()]
VARIANTS += [
    ("euler-trailing", "euler", SDXL, {"timestep_spacing": "trailing"}),
    ("euler-linspace", "euler", SDXL, {"timestep_spacing": "linspace"}),
    ("euler-offset0", "euler", SDXL, {"steps_offset": 0}),
    ("euler-karras", "euler", SDXL, {"use_karras_sigmas": True}),
    ("euler-karras-linspace", "euler", SDXL, {"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    ("euler-karras-range", "euler", SDXL, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("euler-v", "euler", SDXL, {"prediction_type": "v_prediction"}),
    ("euler-sample", "euler", SDXL, {"prediction_type": "sample"}),
    ("euler-linear", "euler", SDXL, LINEAR),
    ("euler-cosine", "euler", SDXL, COSINE),
    ("euler-trained", "euler", SDXL, TRAINED),
    ("euler-zsnr", "euler", SDXL, ZSNR),
    ("euler-sigma-min", "euler", SDXL, {"final_sigmas_type": "sigma_min"}),
    ("euler-log-linear", "euler", SDXL, {"interpolation_type": "log_linear"}),
    ("euler_a", "euler_a", SDXL, {}),
    ("euler_a-class-name", "EulerAncestralDiscreteScheduler", SDXL, {"use_karras_sigmas": True}),  # ignored
    ("euler_a-trailing", "euler_a", SDXL, {"timestep_spacing": "trailing"}),
    ("euler_a-linspace", "euler_a", SDXL, {"timestep_spacing": "linspace"}),
    ("euler_a-v", "euler_a", SDXL, {"prediction_type": "v_prediction"}),
    ("euler_a-linear", "euler_a", SDXL, LINEAR),
    ("euler_a-cosine", "euler_a", SDXL, COSINE),
    ("euler_a-zsnr", "euler_a", SDXL, ZSNR),
    ("dpmpp_2m", "dpmpp_2m", SDXL, {}),
    ("dpmpp_2m-trailing", "dpmpp_2m", SDXL, {"timestep_spacing": "trailing"}),
    ("dpmpp_2m-linspace", "dpmpp_2m", SDXL, {"timestep_spacing": "linspace"}),
    ("dpmpp_2m-v", "dpmpp_2m", SDXL, {"prediction_type": "v_prediction"}),
    ("dpmpp_2m-sample", "dpmpp_2m", SDXL, {"prediction_type": "sample"}),
    ("dpmpp_2m-sigma-min", "dpmpp_2m", SDXL, {"final_sigmas_type": "sigma_min"}),
    (
        "dpmpp_2m-sigma-min-no-lof",
        "dpmpp_2m",
        SDXL,
        {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    ),
    ("dpmpp_2m-euler-at-final", "dpmpp_2m", SDXL, {"final_sigmas_type": "sigma_min", "euler_at_final": True}),
    ("dpmpp_2m-order1", "DPMSolverMultistepScheduler", SDXL, {"solver_order": 1}),
    ("dpmpp_2m-heun", "dpmpp_2m", SDXL, {"solver_type": "heun"}),
    ("dpmpp_2m-zsnr", "dpmpp_2m", SDXL, ZSNR),
    ("dpmpp_2m-linear", "dpmpp_2m", SDXL, LINEAR),
    ("dpmpp_2m-cosine", "dpmpp_2m", SDXL, COSINE),
    ("dpmpp_2m_karras", "dpmpp_2m_karras", SDXL, {}),
    ("dpmpp_2m_karras-class-name", "DPMSolverMultistepScheduler", SDXL, {"use_karras_sigmas": True}),
    ("dpmpp_2m_karras-v", "dpmpp_2m_karras", SDXL, {"prediction_type": "v_prediction"}),
    ("dpmpp_2m_karras-cosine", "dpmpp_2m_karras", SDXL, COSINE),  # fractional timesteps (no rounding)
    ("dpmpp_2m_karras-range", "dpmpp_2m_karras", SDXL, {"sigma_min": 0.1, "sigma_max": 10.0}),  # foreign keys
    ("dpmpp_2m_karras-sigma-min", "dpmpp_2m_karras", SDXL, {"final_sigmas_type": "sigma_min"}),
    ("ddim", "ddim", SDXL, {}),
    ("ddim-defaults", "ddim", SDXL, {"_use_default_values": ["clip_sample", "set_alpha_to_one"]}),
    ("ddim-trailing", "ddim", SDXL, {"timestep_spacing": "trailing"}),
    ("ddim-linspace", "ddim", SDXL, {"timestep_spacing": "linspace"}),
    ("ddim-v", "ddim", SDXL, {"prediction_type": "v_prediction"}),
    ("ddim-sample", "ddim", SDXL, {"prediction_type": "sample"}),
    ("ddim-alpha-one", "ddim", SDXL, {"set_alpha_to_one": True}),
    ("ddim-clip", "ddim", SDXL, {"clip_sample": True, "clip_sample_range": 0.5}),
    ("ddim-zsnr", "ddim", SDXL, ZSNR),
    ("ddim-cosine", "ddim", SDXL, COSINE),
    ("lcm-v", "lcm", LCM, {"prediction_type": "v_prediction"}),
    ("lcm-sample", "lcm", LCM, {"prediction_type": "sample"}),
    ("lcm-origin-25", "lcm", LCM, {"original_inference_steps": 25}),
    ("lcm-scaling-5", "lcm", LCM, {"timestep_scaling": 5.0}),
    ("lcm-clip", "lcm", LCM, {"clip_sample": True, "clip_sample_range": 0.5}),
    ("lcm-linear", "lcm", LCM, LINEAR),
    ("lcm-zsnr", "lcm", LCM, {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}),
    ("lcm-from-sdxl", "lcm", SDXL, {}),
]
STEPS = [1, 2, 3, 4, 7, 8, 13, 20, 25, 50]
SHAPE = (1, 4, 8, 6)


def diffusers_scheduler(name: str | None, config: dict):
    name = name or config["_class_name"]
    class_name, overrides = DIFFUSERS.get(name, (name, {}))
    return getattr(diffusers, class_name).from_config(config, **overrides)


def fake_model(x: np.ndarray, t) -> np.ndarray:
    """A deterministic stand-in for the guided UNet output (numpy, so both loops get identical bits)."""
    x = np.asarray(x, dtype=np.float32)  # close to the noise in x (bounded x0), plus a nonlinear part
    return np.float32(0.9) * x + np.float32(0.1) * np.tanh(x + np.float32(float(t) / 1000.0)) * np.cos(3 * x)


def torch_noise(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


def assert_close(
    actual,
    expected,
    atol: float,
    magnitude: float = 0.0,
    what: str = "",
    strict: bool = False,
    slack: Callable[[], float] | None = None,
) -> None:
    """|actual - expected| <= atol * max(1, M / 8), M the largest magnitude involved; strict: <= atol.

    atol holds as is up to |x| = 8; above it the bound grows to stay >= 1 float32 ulp at M. Needed because
    diffusers' tables carry torch's CPU float32 sqrt (MKL VML), which is not correctly rounded on every CPU
    (MKL 2024.2: through its AVX-512 kernel about 0.6% of float32 inputs come out 1 ulp off numpy's correctly
    rounded sqrt; through its AVX2 kernel, MKL_ENABLE_INSTRUCTIONS=AVX2, none), and large sigmas scale that up.
    slack (not strict): called only when that bound is exceeded; what it returns is added to the bound.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, max(magnitude, float(np.max(np.abs(expected), initial=0.0))) / 8)
    bound = atol if strict else atol * scale
    error = float(np.max(np.abs(actual - expected), initial=0.0))
    if error > bound and slack is not None and not strict:
        extra = slack()
        what, bound = f"{what} (bound {bound:.3g} + sqrt slack {extra:.3g})", bound + extra
    assert error <= bound, f"{what}: max |diff| {error:.3g} > {bound:.3g}"


def diffusers_loop(sched, timesteps, latents: np.ndarray, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The SDXL pipelines' loop: scale_model_input, model, step(..., generator) -> [(latents, denoised)]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(latents.copy())
    kwargs = {"generator": generator}
    if isinstance(sched, diffusers.DDIMScheduler):
        kwargs["eta"] = 0.0
    states = []
    for t in timesteps:
        x_in = sched.scale_model_input(x, t)
        out = torch.from_numpy(fake_model(x_in.numpy(), t))
        result = sched.step(out, t, x, **kwargs)
        x = result.prev_sample
        if isinstance(sched, diffusers.DPMSolverMultistepScheduler):
            denoised = sched.model_outputs[-1]
        elif isinstance(sched, diffusers.LCMScheduler):
            denoised = result.denoised
        else:
            denoised = result.pred_original_sample
        states.append((x.numpy().copy(), denoised.numpy().copy()))
    return states


def dpm_sqrt_slack(make_scheduler, start: np.ndarray, theirs) -> list[tuple[float, float]]:
    """Per step (latents, denoised): how far 1-ulp errors of torch's sqrt in alpha_t move diffusers' own states.

    DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t computes alpha_t = 1 / (sigma**2 + 1) ** 0.5 at run time
    with torch's CPU sqrt, which may be 1 ulp off (see assert_close); ours rounds correctly, so at any sigma our
    alpha_t, and sigma_t = sigma * alpha_t, may differ from diffusers' by 1 ulp. For every distinct sigma and
    both directions, run diffusers' loop again with that sigma's alpha_t moved by 1 ulp; sum |change| over the
    sigmas (element-wise; max over the sigma's two directions): the first-order bound for any mix of such errors.
    """
    inf = torch.tensor(float("inf"))
    total = [(np.zeros(latents.shape), np.zeros(denoised.shape)) for latents, denoised in theirs]
    for value in sorted({float(sigma) for sigma in make_scheduler().sigmas if sigma > 0}):
        moved = []
        for direction in (inf, -inf):
            sched = make_scheduler()

            def nudged(sigma, original=sched._sigma_to_alpha_sigma_t, value=value, direction=direction):
                alpha_t, sigma_t = original(sigma)
                if float(sigma) != value:
                    return alpha_t, sigma_t
                alpha_t = torch.nextafter(alpha_t, direction)
                return alpha_t, sigma * alpha_t

            sched._sigma_to_alpha_sigma_t = nudged
            moved.append(diffusers_loop(sched, sched.timesteps, start))
        for i, (latents, denoised) in enumerate(theirs):
            for sum_, j, expected in ((total[i][0], 0, latents), (total[i][1], 1, denoised)):
                expected = expected.astype(np.float64)
                sum_ += np.maximum(*(np.abs(run[i][j].astype(np.float64) - expected) for run in moved))
    return [(float(latents.max()), float(denoised.max())) for latents, denoised in total]


def check_states(
    ours,
    theirs,
    start: np.ndarray,
    amp: float = 1.0,
    carry: bool = False,
    strict: bool = False,
    slack: Callable[[], list[tuple[float, float]]] | None = None,
) -> None:
    """Every step's latents and denoised at atol 1e-5, scaled by the step's magnitude (times amp).

    carry: scale by the largest magnitude so far (a step's rounding error is inherited by the later steps).
    strict: plain atol 1e-5 whatever the magnitude.
    slack: per step (latents, denoised) additions to the bound (e.g. dpm_sqrt_slack), computed only when the
    plain bound is exceeded, and never for strict.
    """
    atol = 1e-5 * amp
    assert len(ours) == len(theirs)
    slacks = functools.cache(slack) if slack is not None else None
    before = float(np.abs(start).max())
    for i, (state, (latents, denoised)) in enumerate(zip(ours, theirs, strict=True)):
        assert state.index == i
        assert state.latents.dtype == np.float32
        magnitude = max(before, float(np.abs(latents).max()), float(np.abs(denoised).max()))
        pairs = ((state.latents, latents), (state.denoised, denoised))
        for j, (what, (actual, expected)) in enumerate(zip(("latents", "denoised"), pairs, strict=True)):
            extra = None if slacks is None else (lambda i=i, j=j: slacks()[i][j])
            assert_close(actual, expected, atol, magnitude, f"{what}, step {i}", strict, extra)
        before = magnitude if carry else float(np.abs(latents).max())


def test_configs_match_shared_folder():
    if not SHARED_CONFIGS.is_dir():
        pytest.skip(f"no {SHARED_CONFIGS} (the shared/ folder beside the checkout) on this machine")
    for model, config in MODEL_CONFIGS.items():
        assert json.loads((SHARED_CONFIGS / f"{model}.json").read_text())["scheduler"] == config, model


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name, base, changes", [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_text2img_matches_diffusers(name, base, changes, steps):
    config = {**base, **changes}
    theirs = diffusers_scheduler(name, config)
    ours = create_scheduler(config, name)
    try:
        theirs.set_timesteps(steps)
    except ValueError:  # e.g. LCM with more steps than original_inference_steps
        with pytest.raises(ValueError, match=str(steps)):
            ours.plan(steps)
        return
    plan = ours.plan(steps)
    # SDXL's betas top out at sigma 14.6, linear ones at 157, cosine ones at 20291: x0 = (x - sigma_t * eps)
    # / alpha_t (DPM, DDIM, LCM) magnifies 1-ulp differences of alpha_t by 1 / alpha_t ~ sigma_max
    amp = {id(LINEAR): 2.0, id(COSINE): 4.0}.get(id(changes), 1.0)
    # zero terminal SNR starts at sigma 4096 (latents ~1e4, float32 ulp ~1e-3); later steps inherit that
    carry = bool(changes.get("rescale_betas_zero_snr"))
    strict = name is None and not changes  # the shipping model configs: the plain tolerances

    assert_close(plan.timesteps, theirs.timesteps.numpy(), 1e-6, what="timesteps", strict=strict)
    assert plan.timesteps.dtype == np.float32
    if hasattr(theirs, "sigmas"):
        assert_close(plan.schedule.sigmas, theirs.sigmas.numpy(), 1e-6, what="sigmas", strict=strict)
    init_sigma = float(theirs.init_noise_sigma)
    assert_close(plan.init_noise_sigma, init_sigma, 1e-6, what="init_noise_sigma", strict=strict)

    noise = np.random.default_rng(steps).standard_normal(SHAPE, dtype=np.float32)
    if hasattr(theirs, "set_begin_index"):  # as StableDiffusionXLPipeline.__call__ does (not DDIM)
        theirs.set_begin_index(0)
    init = torch.from_numpy(noise) * theirs.init_noise_sigma
    expected = diffusers_loop(theirs, theirs.timesteps, init.numpy())
    draw = torch_noise() if plan.stochastic else None  # deterministic schedulers must never draw
    states = list(plan.sample(noise * plan.init_noise_sigma, fake_model, draw))
    # DPM's alpha_t = 1 / sqrt(sigma^2 + 1) is taken with torch's sqrt at every step, and the loop does not keep
    # a 1-ulp error of it local: e.g. dpmpp_2m_karras-cosine, 7 steps, on AVX-512 MKL, torch's sqrt(3144929.25) is
    # 1773.394775 (correctly rounded: 1773.394897), so alpha_t at sigma 1773.39 is 1 ulp high and step 1's latents
    # differ by 4.8e-7 (sigma_t / sigma_s0 is 2 ulps off); step 2's x0 = (x - sigma_t * eps) / alpha_t takes that
    # times up to 664 (1 / alpha_t times the model's slope) plus 1 ulp of alpha_t times |x| / alpha_t: 9.2e-4 at
    # |x0| 741, in bounds; the later steps carry it and grow it to 2.3e-4 at step 6, beyond the bound there
    # (4e-5 * 39.25 / 8 = 2.0e-4), which scales with step 6's magnitude, not step 2's. That growth is the loop's own:
    # one ulp more in the starting latents moves diffusers' step 6 by 1.9e-4. So a step may also differ by what
    # 1-ulp alpha_t errors move diffusers' own states (dpm_sqrt_slack: 5.6e-4 there), never for the strict configs.
    slack = None
    if isinstance(theirs, diffusers.DPMSolverMultistepScheduler) and not strict:

        def make_scheduler():
            sched = diffusers_scheduler(name, config)
            sched.set_timesteps(steps)
            sched.set_begin_index(0)
            return sched

        slack = functools.partial(dpm_sqrt_slack, make_scheduler, init.numpy(), expected)
    check_states(states, expected, init.numpy(), amp, carry, strict, slack)
    assert [s.timestep for s in states] == list(plan.timesteps)


# --- the pipelines' schedule cuts -------------------------------------------------------------------------
CUT_SCHEDULERS = ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "lcm"]
CUT_CONFIGS = {"euler": SDXL, "lcm": LCM}


def _cut_config(name: str) -> dict:
    return CUT_CONFIGS.get(name, SDXL)


def img2img_timesteps(sched, steps: int, strength: float, denoising_start: float | None):
    """diffusers StableDiffusionXLImg2ImgPipeline.get_timesteps on a stand-in pipeline object."""
    sched.set_timesteps(steps)
    fake_pipe = SimpleNamespace(scheduler=sched)
    get = diffusers.StableDiffusionXLImg2ImgPipeline.get_timesteps
    timesteps, _ = get(fake_pipe, steps, strength, "cpu", denoising_start=denoising_start)
    return timesteps


def apply_denoising_end(sched, timesteps, denoising_end: float):
    """The "Apply denoising_end" lines of StableDiffusionXLPipeline.__call__ (also in the img2img one)."""
    num_train = sched.config.num_train_timesteps
    cutoff = int(round(num_train - (denoising_end * num_train)))
    kept = len(list(filter(lambda ts: ts >= cutoff, timesteps)))
    return timesteps[:kept]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("strength", [0.1, 0.3, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("name", CUT_SCHEDULERS)
def test_strength_matches_img2img_pipeline(name, strength, steps):
    config = _cut_config(name)
    theirs = diffusers_scheduler(name, config)
    try:
        expected = img2img_timesteps(theirs, steps, strength, None)
    except ValueError:
        with pytest.raises(ValueError):
            create_scheduler(config, name).plan(steps, strength=strength)
        return
    if len(expected) == 0:  # diffusers runs an empty loop on an un-noised latent; we refuse
        with pytest.raises(ValueError, match="no denoising step"):
            create_scheduler(config, name).plan(steps, strength=strength)
        return
    plan = create_scheduler(config, name).plan(steps, strength=strength)
    np.testing.assert_array_equal(plan.timesteps, expected.numpy().astype(np.float32))
    assert plan.begin_index == getattr(theirs, "begin_index", plan.begin_index)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("name", CUT_SCHEDULERS)
def test_denoising_end_and_start_match_pipelines(name, fraction, steps):
    config = _cut_config(name)
    ours = create_scheduler(config, name)
    try:
        diffusers_scheduler(name, config).set_timesteps(steps)
    except ValueError:
        return  # LCM beyond original_inference_steps: covered by the text2img test
    # base: text2img with denoising_end
    theirs = diffusers_scheduler(name, config)
    theirs.set_timesteps(steps)
    base = apply_denoising_end(theirs, theirs.timesteps, fraction)
    # refiner: img2img with denoising_start (strength ignored)
    theirs_refiner = diffusers_scheduler(name, config)
    refiner = img2img_timesteps(theirs_refiner, steps, 0.3, fraction)
    for kwargs, expected in (({"denoising_end": fraction}, base), ({"denoising_start": fraction}, refiner)):
        if len(expected) == 0:
            with pytest.raises(ValueError, match="no denoising step"):
                ours.plan(steps, strength=0.3 if "denoising_start" in kwargs else None, **kwargs)
            continue
        plan = ours.plan(steps, strength=0.3 if "denoising_start" in kwargs else None, **kwargs)
        np.testing.assert_array_equal(plan.timesteps, expected.numpy().astype(np.float32))
    if len(refiner) and hasattr(theirs_refiner, "begin_index"):
        begin = create_scheduler(config, name).plan(steps, denoising_start=fraction).begin_index
        assert begin == theirs_refiner.begin_index


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("strength", [0.3, 0.99])
@pytest.mark.parametrize("name", CUT_SCHEDULERS)
def test_img2img_loop_matches_diffusers(name, strength, steps):
    """add_noise at the first kept step, then the loop from begin_index (diffusers img2img)."""
    config = _cut_config(name)
    theirs = diffusers_scheduler(name, config)
    timesteps = img2img_timesteps(theirs, steps, strength, None)
    plan = create_scheduler(config, name).plan(steps, strength=strength)
    rng = np.random.default_rng(1)
    image, noise = rng.standard_normal((2, *SHAPE), dtype=np.float32)
    expected_x = theirs.add_noise(torch.from_numpy(image), torch.from_numpy(noise), timesteps[:1]).numpy()
    x = plan.add_noise(image, noise)
    assert_close(x, expected_x, 1e-5, what="add_noise")
    expected = diffusers_loop(theirs, timesteps, expected_x)
    check_states(list(plan.sample(x, fake_model, torch_noise())), expected, expected_x)


@pytest.mark.parametrize("fraction", [0.5, 0.8])
@pytest.mark.parametrize("name", CUT_SCHEDULERS)
def test_base_refiner_handoff_loops_match_diffusers(name, fraction):
    """Base runs to denoising_end, the refiner (a fresh scheduler) continues from denoising_start."""
    config, steps = _cut_config(name), 8
    latents = np.random.default_rng(2).standard_normal(SHAPE, dtype=np.float32)
    base_theirs = diffusers_scheduler(name, config)
    base_theirs.set_timesteps(steps)
    if hasattr(base_theirs, "set_begin_index"):
        base_theirs.set_begin_index(0)
    base_ts = apply_denoising_end(base_theirs, base_theirs.timesteps, fraction)
    init = (torch.from_numpy(latents) * base_theirs.init_noise_sigma).numpy()
    base_expected = diffusers_loop(base_theirs, base_ts, init, seed=3)
    base_plan = create_scheduler(config, name).plan(steps, denoising_end=fraction)
    base_states = list(base_plan.sample(latents * base_plan.init_noise_sigma, fake_model, torch_noise(3)))
    check_states(base_states, base_expected, init)

    refiner_theirs = diffusers_scheduler(name, config)
    refiner_ts = img2img_timesteps(refiner_theirs, steps, 0.3, fraction)
    refiner_expected = diffusers_loop(refiner_theirs, refiner_ts, base_expected[-1][0], seed=4)
    refiner_plan = create_scheduler(config, name).plan(steps, denoising_start=fraction)
    refiner_states = list(refiner_plan.sample(base_states[-1].latents, fake_model, torch_noise(4)))
    check_states(refiner_states, refiner_expected, base_expected[-1][0])
