"""The library owns the whole generation: the refiner chain and the presets through the Python API, typed and
validated parameters, one UNet denoiser per generation (safe to share a pipeline between threads), a bounded
compile cache."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from PIL import Image

from runtime.errors import RuntimeInputError
from runtime.params import GenerationParams
from runtime.pipeline import SDXLPipeline
from tests.cli import run

SMALL = dict(prompt="a cat", height=128, width=192, num_inference_steps=4, seed=5)
CLI_SMALL = ["--prompt", "a cat", "--height", "128", "--width", "192", "--steps", "4", "--seed", "5",
             "--precision", "f32", "--cache-dir", "", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def chain(tiny):
    _, base = tiny("base")
    _, refiner = tiny("refiner")
    return base, refiner, SDXLPipeline(base, precision="f32", cache_dir=None, refiner=refiner)


@pytest.mark.parametrize("mode", [{"high_noise_frac": 0.8}, {"refiner_strength": 0.4}, {}])
def test_refiner_chain_through_the_api_equals_the_cli(chain, tmp_path, mode):
    base, refiner, pipe = chain
    gen = pipe.generate(**SMALL, **mode)
    states = list(gen)
    assert [s.index for s in states] == list(range(gen.total)) and all(s.total == gen.total for s in states)
    result = gen.result()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in mode.items()]
    out = tmp_path / "r.png"
    proc = run("runtime.generate", "--model", base, "--refiner", refiner, *flags, *CLI_SMALL, "--output", out)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), result.images[0])
    expected = mode or {"refiner_strength": 0.3}  # SDEdit at 0.3 when neither is given, as the CLI always did
    assert {k: result.parameters[k] for k in expected} == expected


def test_ensemble_equals_the_two_stages_run_by_hand(chain):
    """The chain is exactly base(denoising_end=f) -> refiner(image=latents, denoising_start=f)."""
    base, refiner, pipe = chain
    chained = pipe(**SMALL, high_noise_frac=0.7)
    by_hand_base = SDXLPipeline(base, precision="f32", cache_dir=None)
    by_hand_refiner = SDXLPipeline(refiner, precision="f32", cache_dir=None)
    latents = by_hand_base(**SMALL, denoising_end=0.7, output_type="latent").latents
    kw = {k: v for k, v in SMALL.items() if k not in ("height", "width")}
    second = by_hand_refiner(**kw, image=latents, denoising_start=0.7)
    np.testing.assert_array_equal(chained.images, second.images)


def test_refiner_chain_errors(tiny, chain):
    _, base = tiny("base")
    _, _, pipe = chain
    plain = SDXLPipeline(base, precision="f32", cache_dir=None)
    with pytest.raises(RuntimeInputError, match="need a refiner"):
        plain(**SMALL, high_noise_frac=0.8)
    with pytest.raises(RuntimeInputError, match="choose one of high_noise_frac"):
        pipe(**SMALL, high_noise_frac=0.8, refiner_strength=0.3)
    with pytest.raises(RuntimeInputError, match="no denoising step"):  # checked before the base runs
        pipe.generate(**SMALL, high_noise_frac=0.9999)
    with pytest.raises(RuntimeInputError, match="not a refiner folder"):
        SDXLPipeline(base, precision="f32", cache_dir=None, refiner=base)


def test_lcm_folder_presets_through_the_api(tiny):
    _, lcm = tiny("lcm")
    pipe = SDXLPipeline(lcm, precision="f32", cache_dir=None)
    gen = pipe.generate(prompt="a cat", height=128, width=128, seed=1)
    assert gen.total == 4 and len(list(gen)) == 4
    params = gen.result().parameters
    assert (params["num_inference_steps"], params["guidance_scale"]) == (4, 8.0)  # w-embedding UNet: guidance 8
    explicit = pipe(prompt="a cat", height=128, width=128, seed=1, num_inference_steps=2, guidance_scale=3.0)
    assert (explicit.parameters["num_inference_steps"], explicit.parameters["guidance_scale"]) == (2, 3.0)


def test_presets_follow_the_folder_and_the_scheduler(tiny):
    _, base = tiny("base")
    info = SDXLPipeline(base, precision="f32", cache_dir=None).info
    assert info.presets(None, None, None) == {"scheduler": None, "num_inference_steps": 50, "guidance_scale": 5.0}
    assert info.presets("lcm", None, None) == {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0}
    assert info.presets("euler", 7, 2.0) == {"scheduler": "euler", "num_inference_steps": 7, "guidance_scale": 2.0}


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(seed=2**64), "seed="),
        (dict(seed=-1), "seed="),
        (dict(prompt=3), "prompt must be a string"),
        (dict(prompt=["a", 3]), "prompt must be a string"),
        (dict(negative_prompt=b"x"), "negative_prompt must be a string"),
        (dict(height=64.5), "height=64.5"),
        (dict(num_inference_steps=2.7), "num_inference_steps=2.7"),
        (dict(guidance_scale=math.nan), "guidance_scale=nan"),
        (dict(guidance_scale=3e38), "guidance_scale="),
        (dict(guidance_rescale=math.nan), "guidance_rescale=nan"),
        (dict(guidance_rescale=-0.5), "guidance_rescale=-0.5"),
        (dict(strength=math.inf), "strength=inf"),
        (dict(output_type="jpg"), "output_type='jpg'"),
        (dict(original_size=(1, 2, 3)), "original_size="),
        (dict(aesthetic_score=math.nan), "aesthetic_score=nan"),
    ],
)
def test_parameters_are_validated_once(kwargs, needle):
    with pytest.raises(RuntimeInputError, match=needle.replace("(", r"\(")):
        GenerationParams.create(**{"prompt": "x", **kwargs})


def test_parameters_are_typed_and_frozen():
    p = GenerationParams.create(prompt=("a", "b"), height=np.int64(64), num_images_per_prompt=2, guidance_scale=3)
    assert p.prompt == ["a", "b"] and type(p.height) is int and p.guidance_scale == 3.0 and p.batch == 4
    with pytest.raises(AttributeError):
        p.height = 128
    with pytest.raises(TypeError, match="unknown parameter"):
        GenerationParams.create(prompt="x", guidance=3)


def test_threads_share_a_pipeline_and_get_the_single_threaded_images(tiny):
    """N threads x M generations on one pipeline, two image sizes mixed: every image equals the one the same
    parameters give alone (one infer request per generation; before, 88 of 288 runs were wrong)."""
    _, base = tiny("base")
    pipe = SDXLPipeline(base, precision="f32", cache_dir=None)
    jobs = [dict(prompt=f"a cat {i % 3}", height=64 + 64 * (i % 2), width=64, num_inference_steps=2, seed=i)
            for i in range(6)]  # fmt: skip
    alone = [pipe(**job).images for job in jobs]
    threads, rounds = 4, 12  # 48 generations
    got: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for r in range(rounds):
                j = (k + r) % len(jobs)
                got[(k, r)] = (j, pipe(**jobs[j]).images)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=600)
    assert not errors, errors
    assert len(got) == threads * rounds
    wrong = sum(not np.array_equal(images, alone[j]) for j, images in got.values())
    assert wrong == 0, f"{wrong} of {len(got)} images differ from the single-threaded ones"


def test_compile_cache_is_bounded(tiny):
    """Each image size compiles a UNet; only the `max_compiled` most recently used stay (36 sizes took RSS from
    226 MB to 2.4 GB before the bound)."""
    _, base = tiny("base")
    pipe = SDXLPipeline(base, precision="f32", cache_dir=None)
    pipe.unet.max_compiled = 2
    first = pipe(prompt="x", height=64, width=64, num_inference_steps=1, seed=0).images
    for size in (72, 80, 88, 96):
        pipe(prompt="x", height=size, width=64, num_inference_steps=1, seed=0)
        assert len(pipe.unet._compiled) <= 2
    again = pipe(prompt="x", height=64, width=64, num_inference_steps=1, seed=0).images  # recompiled: same numbers
    np.testing.assert_array_equal(first, again)
    with pytest.raises(RuntimeInputError, match="max_compiled=0"):
        type(pipe.unet)(pipe.core, pipe.unet.xml, max_compiled=0)
