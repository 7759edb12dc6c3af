"""Post-training INT8 quantization of a converted folder's UNet with NNCF, calibrated on the runtime's own steps.

Three stages, each run in a child process by convert.component (the peak memory is then that of one stage):
  calibrate  the torch-free runtime generates from calibration prompts with a recording wrapper around the UNet's
             infer request and keeps the UNet inputs of evenly spaced steps the sampler really visits;
  quantize   nncf.quantize on those inputs: `int8` quantizes weights and activations of every Convolution and
             MatMul (transformer model type, as the OpenVINO SDXL notebooks do) except the layers the notebooks
             keep in higher precision; `hybrid` is optimum-intel's hybrid quantization: int8 weight-only
             compression of the MatMuls and embeddings, weights and activations quantized in the rest;
  report     the same generations with the quantized and the unquantized folder: latents' relative error and
             image PSNR, written to quantization_report.json beside the model.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convert.errors import ConvertError

MODES = ("int8", "hybrid")
REPORT_FILE = "quantization_report.json"
# Kept in f16/bf16 in the OpenVINO SDXL notebooks: the first and last convolution and one sensitive shortcut.
SENSITIVE_LAYERS = ("conv_in", "conv_out", "up_blocks.2.resnets.2.conv_shortcut")

# Varied subjects, styles and lengths; the default when no --calibration-prompts file is given.
DEFAULT_PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "portrait of an old fisherman with a weathered face, dramatic rembrandt lighting, 85mm",
    "a cozy reading nook with a window seat, rain outside, warm lamp light",
    "isometric pixel art of a small medieval village at dusk",
    "a bowl of ramen with a soft-boiled egg, steam rising, food photography",
    "watercolor painting of cherry blossoms over a quiet river",
    "a futuristic city skyline at night with neon signs and flying cars, cyberpunk",
    "macro shot of a dewdrop on a green leaf, shallow depth of field",
    "an oil painting of a stormy sea with a lighthouse, in the style of turner",
    "a red fox sitting in fresh snow, golden hour, wildlife photography",
    "minimalist logo of a mountain and the sun, flat vector, two colors",
    "a medieval knight in ornate armor standing in a misty forest",
    "aerial view of terraced rice fields in the morning fog",
    "a cute robot watering plants in a greenhouse, 3d render, pixar style",
    "black and white street photography, a man with an umbrella crossing a busy street",
    "a bustling spice market in marrakech, vibrant colors",
    "ancient greek marble statue of a woman, museum lighting",
    "a steaming cup of coffee on a wooden table next to an open book",
    "concept art of an alien jungle with bioluminescent plants",
    "a vintage sports car parked on a coastal road, 1960s film photograph",
    "children's book illustration of a bear having a picnic with a rabbit",
    "the interior of a gothic cathedral with stained glass light beams",
    "a snow-covered mountain cabin under the northern lights",
    "studio photo of a pair of sneakers floating on a pastel background",
]


@dataclass
class Calibration:
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    size: int = 64  # UNet calls recorded
    steps: int | None = None  # the sampler's steps per prompt (None: 4 for LCM models, else 20)
    height: int | None = None  # None: the model's default size
    width: int | None = None
    report_samples: int = 3  # prompt/seed pairs in the fidelity report (0: no report)


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConvertError(f"--calibration-prompts {path}: cannot read it ({reason})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConvertError(f"--calibration-prompts {path}: the file has no prompts (one per line)")
    return prompts


def check_settings(cal: Calibration) -> None:
    """Bad numbers fail before any conversion work."""
    if cal.size < 1:
        raise ConvertError(f"--calibration-size {cal.size}: must be at least 1 (UNet calls to record)")
    if cal.steps is not None and cal.steps < 1:
        raise ConvertError(f"--calibration-steps {cal.steps}: must be at least 1")
    if cal.report_samples < 0:
        raise ConvertError(f"--report-samples {cal.report_samples}: must be 0 or more")
    for name, v in (("height", cal.height), ("width", cal.width)):
        if v is not None and (v < 8 or v % 8):
            raise ConvertError(f"--calibration-resolution: {name} {v} must be a positive multiple of 8")


# -- calibrate ---------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _generation_settings(pipe, steps: int | None) -> dict:
    """The folder's presets (LCM recipe or diffusers' SDXL defaults), at most 20 steps unless asked."""
    settings = pipe.info.presets(None, steps, None)
    if steps is None:
        settings["num_inference_steps"] = min(settings["num_inference_steps"], 20)
    return settings


def _refiner_image(pipe, seed: int, height: int, width: int) -> dict:
    """A refiner denoises the low-noise end of the schedule: SDEdit from latents (strength 0.3), as after a base."""
    from runtime.rng import TorchGenerator

    f = pipe.vae_scale_factor
    latents = TorchGenerator(seed + 7919).randn((1, 4, height // f, width // f)) * np.float32(0.6)
    return {"image": latents.astype(np.float32), "strength": 0.3}


def calibrate(model_dir: Path, out_file: Path, cal: dict) -> dict:
    """Run the runtime over the calibration prompts; save the recorded UNet inputs to out_file (npz)."""
    from runtime.pipeline import SDXLPipeline

    cal = Calibration(**cal)
    t0 = time.perf_counter()
    pipe = SDXLPipeline(model_dir, cache_dir=None)
    settings = _generation_settings(pipe, cal.steps)
    steps = settings["num_inference_steps"]
    height = cal.height or pipe.default_size
    width = cal.width or pipe.default_size
    samples: list[dict] = []
    # a refiner denoises only the last 30 % of the schedule (see _refiner_image)
    visits = max(1, int(steps * 0.3)) if pipe.is_refiner else steps
    per_prompt = min(visits, math.ceil(cal.size / len(cal.prompts)))
    keep: set[int] = set()
    calls = [0]

    def sink(inputs: dict) -> None:
        if calls[0] in keep:
            samples.append(inputs)
            keep.discard(calls[0])
        calls[0] += 1
        if not keep:
            raise _Stop  # nothing more to record from this generation: skip its remaining steps

    pipe.unet_observers.append(lambda inputs: sink({k: np.array(v, copy=True) for k, v in inputs.items()}))
    generations = 0
    while len(samples) < cal.size:
        prompt = cal.prompts[generations % len(cal.prompts)]
        seed = generations  # a new seed per generation: another pass over the prompts sees new noise
        k = min(per_prompt, cal.size - len(samples))
        keep = {int(round(i)) for i in np.linspace(0, visits - 1, k)} if k > 1 else {visits // 2}
        calls[0] = 0
        kw = dict(prompt=prompt, seed=seed, height=height, width=width, output_type="latent", **settings)
        if pipe.is_refiner:
            del kw["height"], kw["width"]
            kw |= _refiner_image(pipe, seed, height, width)
        before = len(samples)
        try:
            pipe(**kw)
        except _Stop:
            pass
        if len(samples) == before:  # never loop forever on a sampler that calls the UNet less than planned
            raise ConvertError(f"calibration: a {steps}-step generation made fewer UNet calls than {max(keep) + 1}")
        generations += 1
    names = list(samples[0])
    np.savez(out_file, **{f"{i}:{name}": s[name] for i, s in enumerate(samples) for name in names})
    facts = {"samples": len(samples), "generations": generations, "steps": steps, "height": height, "width": width,
             "guidance_scale": settings["guidance_scale"], "prompts": len(cal.prompts),
             "seconds": time.perf_counter() - t0}  # fmt: skip
    return facts


def load_samples(path: Path) -> list[dict]:
    with np.load(path) as data:
        out: dict[int, dict] = {}
        for key in data.files:
            i, name = key.split(":", 1)
            out.setdefault(int(i), {})[name] = data[key]
    return [out[i] for i in sorted(out)]


# -- quantize ----------------------------------------------------------------------------------------------
def _weight_source(node):
    """The Constant behind a weight input (through the f16->f32 Convert), or None."""
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "Constant" else None


def weighted_ops(model) -> list[str]:
    """MatMuls with a constant operand and embedding Gathers: what hybrid mode compresses weight-only."""
    names = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "MatMul" and any(_weight_source(op.input_value(i).get_node()) for i in range(2)):
            names.append(op.get_friendly_name())
        elif kind == "Gather" and _weight_source(op.input_value(0).get_node()) is not None:
            if op.input_value(0).get_element_type().is_real():
                names.append(op.get_friendly_name())
    return names


def sensitive_ops(model) -> list[str]:
    """The Convolutions of SENSITIVE_LAYERS present in this UNet (traced names end in <module path>/aten::...)."""
    out = []
    for op in model.get_ops():
        if op.get_type_name() != "Convolution":
            continue
        path = op.get_friendly_name().split("/")[0]
        if any(path.endswith("." + layer) for layer in SENSITIVE_LAYERS):
            out.append(op.get_friendly_name())
    return out


# NNCF collects its statistics by inference in f32 and SmoothQuant writes rescaled copies of the MatMul weights:
# its peak memory measured about 4.7x the UNet's f32 weights (Segmind Vega, 745 M parameters: 14.0 GiB in int8
# mode), and the SDXL UNet (2.6 B) went over 24 GB with f32 statistics, with or without SmoothQuant, and with
# SmoothQuant even at bf16 statistics. Where f32 statistics would not fit in this share of the machine's memory,
# quantization runs lean: the weights are first compressed to symmetric per-channel int8 (what the quantized
# layers' weights become anyway), then the activations are quantized without SmoothQuant (as optimum-intel's
# hybrid mode does), with statistics at the device's default precision (bf16 on CPUs that have it). On Vega the
# lean int8 IR ran as fast as the standard one (1.72 vs 1.73 s per call at 512x512) with half the peak memory
# while quantizing (7.0 GiB, f32 statistics).
STATISTICS_MEMORY_FACTOR = 4.7
STATISTICS_MEMORY_SHARE = 0.85


def _memory_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return 0


def statistics_precision(model) -> str:
    """f32 (NNCF's own choice), or "default" (lean) where f32 statistics would not fit in this machine's memory."""
    params = sum(int(np.prod(op.get_output_shape(0))) for op in model.get_ops()
                 if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_real())  # fmt: skip
    total = _memory_total()
    need = STATISTICS_MEMORY_FACTOR * 4 * params
    return "default" if total and need > STATISTICS_MEMORY_SHARE * total else "f32"


@contextmanager
def _statistics_at_default_precision():
    """NNCF's OpenVINO engine forces f32 inference (nncf 3.4: OVNativeEngine(use_fp32_precision=True)); let it
    compile at the device's default precision for the duration."""
    from nncf.openvino import engine

    original = engine.OVNativeEngine.__init__

    def init(self, model, use_fp32_precision: bool = True):
        original(self, model, use_fp32_precision=False)

    engine.OVNativeEngine.__init__ = init
    try:
        yield
    finally:
        engine.OVNativeEngine.__init__ = original


def quantize(xml: Path, samples_file: Path, mode: str, out_xml: Path, statistics: str = "auto") -> dict:
    """statistics: "f32", "default" (the device's precision) or "auto" (f32 where it fits in memory)."""
    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.WARNING)  # keep NNCF's progress bars, drop its per-node notices

    t0 = time.perf_counter()
    model = ov.Core().read_model(xml)
    samples = load_samples(samples_file)
    keep = sensitive_ops(model)
    if statistics == "auto":
        statistics = statistics_precision(model)
    common = dict(subset_size=len(samples), model_type=nncf.ModelType.TRANSFORMER)
    with _statistics_at_default_precision() if statistics == "default" else nullcontext():
        quantized = _run_nncf(model, samples, mode, keep, common, lean=statistics == "default")
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, out_xml)
    counts = op_counts(quantized)
    return {"mode": mode, "samples": len(samples), "kept_in_higher_precision": keep, "ops": counts,
            "statistics_precision": statistics, "smooth_quant": mode == "int8" and statistics == "f32",
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _run_nncf(model, samples: list[dict], mode: str, keep: list[str], common: dict, lean: bool):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    no_smooth_quant = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    if mode == "int8" and lean:  # weights to int8 first: the statistics model then holds int8, not f32, weights
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM,
                                           ignored_scope=nncf.IgnoredScope(names=keep, validate=False))  # fmt: skip
        quantized = nncf.quantize(compressed, nncf.Dataset(samples), advanced_parameters=no_smooth_quant,
                                  ignored_scope=nncf.IgnoredScope(names=keep, validate=False), **common)  # fmt: skip
    elif mode == "int8":
        quantized = nncf.quantize(model, nncf.Dataset(samples), ignored_scope=nncf.IgnoredScope(names=keep), **common)
    elif mode == "hybrid":
        weight_only = weighted_ops(model)
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                           ignored_scope=nncf.IgnoredScope(types=["Convolution"]))  # fmt: skip
        quantized = nncf.quantize(compressed, nncf.Dataset(samples), advanced_parameters=no_smooth_quant,
                                  ignored_scope=nncf.IgnoredScope(names=weight_only + keep, validate=False),
                                  **common)  # fmt: skip
    else:
        raise ConvertError(f"--quantize-unet {mode!r}: choose one of {', '.join(MODES)}")
    return quantized


def op_counts(model) -> dict:
    """FakeQuantize nodes and int8/uint8 weight constants: proof the IR is quantized."""
    fq = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    low = sum(
        op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() in ("i8", "u8")
        for op in model.get_ops()
    )
    return {"FakeQuantize": fq, "int8_constants": low}


# -- report ------------------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def report(quantized_dir: Path, reference_dir: Path, cal: dict, log=print) -> dict:
    """Generate the same images with both folders; latents' relative error and PSNR per prompt and seed."""
    from runtime.pipeline import SDXLPipeline

    cal = Calibration(**cal)
    t0 = time.perf_counter()
    ref = SDXLPipeline(reference_dir, cache_dir=None)
    settings = _generation_settings(ref, cal.steps)
    height, width = cal.height or ref.default_size, cal.width or ref.default_size
    prompts = [DEFAULT_PROMPTS[(7 * i) % len(DEFAULT_PROMPTS)] for i in range(cal.report_samples)]
    jobs = []
    for i, prompt in enumerate(prompts):
        job = dict(prompt=prompt, seed=1000 + i, height=height, width=width, output_type="np", **settings)
        if ref.is_refiner:
            del job["height"], job["width"]
            job |= _refiner_image(ref, 1000 + i, height, width)
        jobs.append(job)
    hint = ref.core.get_property(ref.device, "INFERENCE_PRECISION_HINT")
    precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # an ov.Type: "bf16"
    device = ref.device
    refs = [ref(**job) for job in jobs]
    del ref  # one pipeline's models in memory at a time
    quant = SDXLPipeline(quantized_dir, cache_dir=None)
    quants = [quant(**job) for job in jobs]
    del quant
    rows = []
    for job, r, q in zip(jobs, refs, quants, strict=True):
        rel = float(np.linalg.norm(q.latents - r.latents) / max(np.linalg.norm(r.latents), 1e-12))
        rows.append({"prompt": job["prompt"], "seed": job["seed"], "latents_rel_error": rel,
                     "psnr_db": psnr(q.images, r.images)})  # fmt: skip
        log(f"  seed {job['seed']}: latents relative error {rel:.4f}, image PSNR {rows[-1]['psnr_db']:.2f} dB"
            f"  ({job['prompt'][:48]})")  # fmt: skip
    summary = {"mean_psnr_db": float(np.mean([r["psnr_db"] for r in rows])),
               "min_psnr_db": float(min(r["psnr_db"] for r in rows)),
               "max_latents_rel_error": float(max(r["latents_rel_error"] for r in rows))}  # fmt: skip
    return {"settings": {"steps": settings["num_inference_steps"], "guidance_scale": settings["guidance_scale"],
                         "height": height, "width": width, "device": device, "inference_precision": precision},
            "samples": rows, "summary": summary, "seconds": time.perf_counter() - t0}  # fmt: skip


def write_report(out_dir: Path, facts: dict) -> Path:
    path = out_dir / REPORT_FILE
    path.write_text(json.dumps(facts, indent=2, allow_nan=True))
    return path
