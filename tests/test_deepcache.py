"""DeepCache and the guidance cut-off against their reference implementations, same seed, standing tolerances.

DeepCache: diffusers + DeepCache 0.1.1's DeepCacheSDHelper(pipe).set_params(cache_interval, cache_branch_id);
its non-uniform schedule: sample_from_quad_center of DeepCache's SDXL pipeline. Guidance cut-off: diffusers'
"dynamic classifier-free guidance" recipe (callback_on_step_end at step_index == int(num_timesteps * F))."""

from __future__ import annotations

import ast
import contextlib
import os
import warnings

import numpy as np
import pytest
import torch

from tests.parity import assert_parity, run_diffusers, run_ours
from tests.test_img2img import _image

SMALL = dict(prompt="a fox in the snow", negative_prompt="blurry", height=192, width=256)


def deepcache_ref(interval: int, branch: int = 0, full_steps: list[int] | None = None):
    """around(pipe) for run_diffusers: DeepCacheSDHelper enabled for the call, disabled after. full_steps: the
    steps (from the first) that run the whole UNet instead of every interval-th (the quadratic schedule)."""
    from DeepCache.extension.deepcache import DeepCacheSDHelper

    class Helper(DeepCacheSDHelper):
        def is_skip_step(self, block_i, layer_i, blocktype="down"):
            self.start_timestep = self.cur_timestep if self.start_timestep is None else self.start_timestep
            if (self.cur_timestep - self.start_timestep) in full_steps:
                return False
            return super().is_skip_step(block_i, layer_i, blocktype)

    @contextlib.contextmanager
    def around(pipe):
        helper = (DeepCacheSDHelper if full_steps is None else Helper)(pipe=pipe)
        mode = "uniform" if full_steps is None else "listed"  # not "uniform": the listed steps decide
        helper.set_params(cache_interval=interval, cache_branch_id=branch, skip_mode=mode)
        helper.enable()
        try:
            yield
        finally:
            helper.disable()

    return around


def cutoff_ref(fraction: float):
    """diffusers' dynamic CFG recipe: after step int(num_timesteps * F) the conditional halves, guidance 0."""

    def callback(pipe, i, t, kw):
        if i == int(pipe.num_timesteps * fraction):
            for k in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
                kw[k] = kw[k].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return kw

    tensors = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    return dict(on_step_end=callback, callback_on_step_end_tensor_inputs=tensors)


def ours(ov_dir, seed, **kwargs):
    """Our pipeline; the strategies are GenerationParams fields (deepcache_interval, ..., guidance_cutoff)."""
    return run_ours(ov_dir, seed, **kwargs)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
@pytest.mark.parametrize("kind", ["base", "ssd-1b", "vega"])
def test_deepcache_text2img(tiny, kind, guidance):
    src, ov_dir = tiny(kind)
    kwargs = dict(SMALL, num_inference_steps=7, guidance_scale=guidance)
    theirs = run_diffusers(src, seed=3, around=deepcache_ref(3), **kwargs)
    assert_parity(ours(ov_dir, seed=3, deepcache_interval=3, **kwargs), theirs)


@pytest.mark.parametrize("kind,branch", [("base", 1), ("base", 2), ("base", 3), ("base", 5), ("ssd-1b", 4),
                                         ("vega", 3)])  # fmt: skip
def test_deepcache_branches(tiny, kind, branch):
    """Other cache positions: partial down/up blocks (branch % 3), deeper blocks (branch // 3)."""
    src, ov_dir = tiny(kind)
    kwargs = dict(SMALL, num_inference_steps=5, guidance_scale=6.0)
    theirs = run_diffusers(src, seed=4, around=deepcache_ref(2, branch), **kwargs)
    assert_parity(ours(ov_dir, seed=4, deepcache_interval=2, deepcache_branch=branch, **kwargs), theirs)


def test_deepcache_img2img(tiny):
    src, ov_dir = tiny("base")
    kwargs = dict(prompt="a cat", image=_image(), strength=0.6, num_inference_steps=10)
    theirs = run_diffusers(src, seed=6, img2img=True, around=deepcache_ref(3), **kwargs)
    assert_parity(ours(ov_dir, seed=6, deepcache_interval=3, **kwargs), theirs)


def test_deepcache_refiner_ensemble(tiny):
    """Base with denoising_end, refiner with denoising_start: each counts its full steps from its first step."""
    base_src, base_ov = tiny("base")
    ref_src, ref_ov = tiny("refiner")
    common = dict(prompt="a castle on a hill", negative_prompt="fog", num_inference_steps=10)
    ours_base = ours(base_ov, seed=8, deepcache_interval=2, denoising_end=0.6, output_type="latent", **common)
    theirs = run_diffusers(base_src, seed=8, around=deepcache_ref(2), denoising_end=0.6, output_type="latent",
                           **common)  # fmt: skip
    assert_parity(ours_base, theirs)
    mine = ours(ref_ov, seed=9, deepcache_interval=3, image=ours_base[0], denoising_start=0.6, **common)
    theirs = run_diffusers(ref_src, seed=9, img2img=True, around=deepcache_ref(3), image=torch.from_numpy(theirs[0]),
                           denoising_start=0.6, **common)  # fmt: skip
    assert_parity(mine, theirs)


def test_deepcache_lcm(tiny):
    src, ov_dir = tiny("lcm")
    kwargs = dict(prompt="a fox", height=256, width=192, num_inference_steps=6, guidance_scale=8.0)
    theirs = run_diffusers(src, seed=2, around=deepcache_ref(2), **kwargs)
    assert_parity(ours(ov_dir, seed=2, deepcache_interval=2, **kwargs), theirs)


def _quad_center():
    """sample_from_quad_center as DeepCache 0.1.1 ships it (its SDXL module imports a UNet that today's diffusers
    no longer supports, so the function is taken from the source file)."""
    import DeepCache

    path = os.path.join(os.path.dirname(DeepCache.__file__), "sdxl", "pipeline_stable_diffusion_xl.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    ns = {"np": np}
    exec(compile(ast.Module([fn], []), path, "exec"), ns)
    return ns["sample_from_quad_center"]


def test_quadratic_schedule_is_deepcaches():
    from runtime.deepcache import full_steps

    ref = _quad_center()
    checked = 0
    for total in (10, 20, 25, 30, 50):
        for interval in (2, 3, 4, 5):
            for center in (0, 5, 10, 15):
                for pow in (1.2, 1.4, 1.6):
                    n = -(-total // interval)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # its complex cast warns
                        try:
                            expected, _ = ref(total, n, center=center, pow=pow)
                        except ValueError:
                            continue
                    got = full_steps(total, interval, "quadratic", center, pow)
                    assert got == {int(i) for i in expected}, (total, interval, center, pow)
                    checked += 1
    assert checked > 100


def test_deepcache_quadratic_generation(tiny):
    """The quadratic schedule's full steps with DeepCacheSDHelper's caching in between."""
    from runtime.deepcache import full_steps

    src, ov_dir = tiny("base")
    kwargs = dict(SMALL, num_inference_steps=10, guidance_scale=5.0)
    steps = sorted(full_steps(10, 3, "quadratic", 2, 1.4))
    assert steps != list(range(0, 10, 3))
    theirs = run_diffusers(src, seed=5, around=deepcache_ref(3, full_steps=steps), **kwargs)
    mine = ours(ov_dir, seed=5, deepcache_interval=3, deepcache_schedule="quadratic", deepcache_center=2, **kwargs)
    assert_parity(mine, theirs)


@pytest.mark.parametrize("case", ["text2img", "batch", "img2img"])
def test_guidance_cutoff(tiny, case):
    src, ov_dir = tiny("base")
    kwargs = dict(SMALL, num_inference_steps=8, guidance_scale=6.0)
    img2img = case == "img2img"
    if case == "batch":
        kwargs.update(prompt=["a fox", "a cat"], negative_prompt=["blurry", "ugly"], num_images_per_prompt=2)
    if img2img:
        kwargs = dict(prompt="a cat", negative_prompt="blurry", image=_image(), strength=0.7, num_inference_steps=9)
    theirs = run_diffusers(src, seed=7, img2img=img2img, **cutoff_ref(0.4), **kwargs)
    assert_parity(ours(ov_dir, seed=7, guidance_cutoff=0.4, **kwargs), theirs)


def test_deepcache_with_cutoff_runs(tiny):
    """Both at once (no reference runs both: the helper's cached features keep the guided batch): the kept
    features' conditional halves carry on at batch B; finite, and equal to the cut-off alone at full steps."""
    _, ov_dir = tiny("base")
    kwargs = dict(SMALL, num_inference_steps=8, guidance_scale=6.0)
    lat, img = ours(ov_dir, seed=7, guidance_cutoff=0.4, deepcache_interval=2, **kwargs)
    assert np.isfinite(lat).all() and img.shape == (1, 192, 256, 3)


def test_deepcache_refuses_an_ir_without_module_names():
    import openvino as ov

    from runtime.deepcache import derive
    from runtime.errors import RuntimeInputError

    sample = ov.opset13.parameter([1, 4, 8, 8], ov.Type.f32, name="sample")
    sample.output(0).get_tensor().set_names({"sample"})
    out = ov.opset13.relu(sample)
    out.output(0).get_tensor().set_names({"out_sample"})
    with pytest.raises(RuntimeInputError, match="module names"):
        derive(ov.Model([out], [sample]), 0)


def test_deepcache_branch_out_of_range(tiny):
    import openvino as ov

    from runtime.deepcache import derive
    from runtime.errors import RuntimeInputError

    _, ov_dir = tiny("base")
    model = ov.Core().read_model(ov_dir / "unet" / "openvino_model.xml")
    with pytest.raises(RuntimeInputError, match=r"deepcache_branch=6: this UNet has 2 up blocks, so 0..5"):
        derive(model, 6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(deepcache_interval=0), "deepcache_interval=0 must be an integer in 1..1000"),
        (dict(deepcache_interval=2.5), "deepcache_interval=2.5 must be an integer"),
        (dict(deepcache_branch=-1), "deepcache_branch=-1 must be a non-negative integer"),
        (dict(deepcache_schedule="cubic"), "deepcache_schedule='cubic': choose one of uniform, quadratic"),
        (dict(deepcache_center=float("nan")), "deepcache_center=nan must be a finite non-negative number"),
        (dict(deepcache_pow=1.0), r"deepcache_pow=1.0 must be in \(1, 10\]"),
        (dict(guidance_cutoff=1.0), r"guidance_cutoff=1.0 must be between 0 and 1 \(exclusive\)"),
    ],
)
def test_parameters_are_checked(kwargs, message):
    from runtime.errors import RuntimeInputError
    from runtime.params import GenerationParams

    with pytest.raises(RuntimeInputError, match=message):
        GenerationParams.create(prompt="x", **kwargs)


def test_cli_flags_are_recorded_and_made_again(tiny, tmp_path):
    """The CLI's flags reach the generation (equal to the API's result), the PNG records them, --from-png makes the
    same pixels; a branch the UNet does not have is one line naming the range."""
    from PIL import Image

    from tests.cli import assert_one_line_error, run
    from tests.parity import our_pipe

    _, ov_dir = tiny("base")
    flags = ["--model", ov_dir, "--prompt", "a cat", "--steps", "5", "--height", "128", "--width", "128", "--seed",
             "3", "--precision", "f32", "--cache-dir", "", "--quiet", "--deepcache-interval", "2",
             "--guidance-cutoff", "0.5"]  # fmt: skip
    proc = run("runtime.generate", *flags, "--output", tmp_path / "a.png")
    assert proc.returncode == 0, proc.stderr
    api = our_pipe(str(ov_dir))(prompt="a cat", num_inference_steps=5, height=128, width=128, seed=3,
                                deepcache_interval=2, guidance_cutoff=0.5)  # fmt: skip
    first = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    assert int(np.abs(first.astype(int) - api.images[0]).max()) <= 1
    proc = run("runtime.generate", "--quiet", "--from-png", tmp_path / "a.png", "--output", tmp_path / "b.png")
    assert proc.returncode == 0, proc.stderr
    assert (np.asarray(Image.open(tmp_path / "b.png").convert("RGB")) == first).all()
    bad = run("runtime.generate", *flags, "--deepcache-branch", "7", "--output", tmp_path / "c.png")
    assert_one_line_error(bad, "--deepcache-branch=7: this UNet has 2 up blocks, so 0..5")


def test_low_memory_cutoff_swaps_the_compiled_unet(tiny):
    """--low-memory: the batch-B UNet is compiled at the switch after the batch-2B one is dropped; same result."""
    from runtime.pipeline import SDXLPipeline
    from tests.parity import our_pipe

    _, ov_dir = tiny("base")
    kwargs = dict(SMALL, num_inference_steps=8, guidance_scale=6.0, seed=7, deepcache_interval=2, guidance_cutoff=0.4)
    low = SDXLPipeline(ov_dir, precision="f32", cache_dir=None, low_memory=True)
    gen = low.generate(**kwargs)
    for state in gen:
        if state.index == 5:  # after the switch: only the batch-B models are compiled
            batches = [dict(k for k in key if len(k) == 2)["sample"][0] for key in low.unet._compiled]
            assert batches and set(batches) == {1}, batches
    np.testing.assert_array_equal(gen.result().latents, our_pipe(str(ov_dir))(**kwargs).latents)
