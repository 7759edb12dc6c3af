"""The anchors: openvino.genai, optimum-intel and diffusers on the same folder, prompt, seed, size and precision.

Each worker runs in a child process of its own (benchmarks.run): load (and compile, where the pipeline has a
separate step), one untimed 1-step call at the measured size, then one timed call. Where the anchor can tell,
the seconds spent in its own model calls during the timed call are reported as `model_calls` (its overhead
ratio is end to end / model calls).
"""

from __future__ import annotations

import importlib.util
import subprocess
import time
from pathlib import Path

from benchmarks.memory import peak_rss_self

now = time.perf_counter


class _TimedCall:
    """Wraps an optimum-intel part's infer request (optimum calls it directly); records the seconds of each call."""

    def __init__(self, target, log: list[float]):
        self._target, self._log = target, log

    def __call__(self, *args, **kwargs):
        t = now()
        out = self._target(*args, **kwargs)
        self._log.append(now() - t)
        return out

    def __getattr__(self, name):
        return getattr(self._target, name)


def _ov_config(spec: dict) -> dict:
    return {"INFERENCE_PRECISION_HINT": spec["precision"]} if spec.get("precision") else {}


def _prime_and_time(call, steps: int, stages: dict, model_calls=None) -> dict:
    """An anchor's end to end: one untimed 1-step call at the measured size, then the timed call.
    model_calls: where the anchor can tell, seconds spent in its model calls during the timed call (a function
    called before it, to reset, and after it)."""
    call(1)
    if model_calls:
        model_calls()
    t = now()
    call(steps)
    stages["end_to_end"] = now() - t
    if model_calls:
        stages["model_calls"] = model_calls()
    return {"stages": stages, "peak_rss_bytes": peak_rss_self()}


def genai(spec: dict, static: bool) -> dict:
    import openvino_genai as og

    h, w, g = spec["height"], spec["width"], spec["guidance_scale"]
    st = {}
    t = now()
    if static:
        pipe = og.Text2ImagePipeline(spec["model"])
        st["load"] = now() - t
        t = now()
        pipe.reshape(1, h, w, g)
        pipe.compile(spec["device"], **_ov_config(spec))
        st["compile"] = now() - t
    else:  # compiles in the constructor, shapes dynamic
        pipe = og.Text2ImagePipeline(spec["model"], spec["device"], **_ov_config(spec))
        st["load"] = now() - t

    def call(steps):
        return pipe.generate(spec["prompt"], width=w, height=h, num_inference_steps=steps, guidance_scale=g,
                             rng_seed=0)  # fmt: skip

    def model_calls():  # genai's own per-call timers (UNet in microseconds, encoders and VAE in milliseconds)
        m = pipe.get_performance_metrics()
        return (sum(m.raw_metrics.unet_inference_durations) / 1e6 + sum(m.get_text_encoder_infer_duration().values())
                / 1e3 + m.get_vae_decoder_infer_duration() / 1e3)  # fmt: skip

    return _prime_and_time(call, spec["steps"], st, model_calls)


def diffusers(spec: dict) -> dict:
    import torch
    from diffusers import DiffusionPipeline

    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    st = {}
    t = now()
    pipe = DiffusionPipeline.from_pretrained(spec["diffusers_source"], torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    st["load"] = now() - t

    def call(steps):
        return pipe(spec["prompt"], height=spec["height"], width=spec["width"], num_inference_steps=steps,
                    guidance_scale=spec["guidance_scale"], generator=torch.Generator("cpu").manual_seed(0),
                    output_type="np")  # fmt: skip

    return _prime_and_time(call, spec["steps"], st)


def optimum(spec: dict, static: bool) -> dict:
    from optimum.intel import OVStableDiffusionXLPipeline

    h, w = spec["height"], spec["width"]
    st = {}
    t = now()
    pipe = OVStableDiffusionXLPipeline.from_pretrained(spec["model"], device=spec["device"], compile=not static,
                                                       ov_config=_ov_config(spec))  # fmt: skip
    st["load"] = now() - t  # dynamic: includes the compile, as genai's constructor does
    if static:
        t = now()
        pipe.reshape(batch_size=1, height=h, width=w, num_images_per_prompt=1)
        pipe.compile()
        st["compile"] = now() - t
    logs: dict[str, list[float]] = {}
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        part = getattr(pipe, name, None)
        if part is not None and getattr(part, "request", None) is not None:  # optimum calls it directly
            part.request = _TimedCall(part.request, logs.setdefault(name, []))

    def call(steps):
        return pipe(spec["prompt"], height=h, width=w, num_inference_steps=steps,
                    guidance_scale=spec["guidance_scale"], output_type="np")  # fmt: skip

    def model_calls():  # None unless the UNet's calls were among those timed
        spent = sum(t for log in logs.values() for t in log) if logs.get("unet") else None
        for log in logs.values():
            log.clear()
        return spent

    return _prime_and_time(call, spec["steps"], st, model_calls)


WORKERS = {
    "genai": lambda s: genai(s, static=False),
    "genai-static": lambda s: genai(s, static=True),
    "optimum": lambda s: optimum(s, static=False),
    "optimum-static": lambda s: optimum(s, static=True),
    "diffusers": diffusers,
}
NAMES = tuple(WORKERS)


def availability(arm: str, diffusers_source: str | None, optimum_python: str | None) -> str | None:
    """None when the anchor can run, else why it is skipped."""
    if arm.startswith("genai"):
        return None if importlib.util.find_spec("openvino_genai") else "openvino_genai not installed"
    if arm == "diffusers":
        if not (importlib.util.find_spec("diffusers") and importlib.util.find_spec("torch")):
            return "diffusers/torch not installed"
        if not diffusers_source:
            return "no --diffusers-source DIR given"
        if not (Path(diffusers_source) / "model_index.json").is_file():
            return f"{diffusers_source}: not a diffusers folder"
        return None
    if arm.startswith("optimum"):
        if not optimum_python:
            return "no --optimum-python PATH given"
        try:
            probe = subprocess.run([optimum_python, "-c", "import optimum.intel"], capture_output=True)
        except OSError as e:
            return f"cannot run {optimum_python}: {e.strerror or e}"
        return None if probe.returncode == 0 else f"optimum.intel not importable by {optimum_python}"
    return f"unknown anchor {arm!r}"
