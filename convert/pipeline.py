"""Convert a whole pipeline, one submodel at a time, into a temporary folder renamed when complete."""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from convert import safety
from convert.errors import ConvertError
from convert.source import Loader, check_scheduler_config, check_single_file, resolve
from runtime.leftovers import cleanup_stale


@dataclass
class Result:
    name: str
    params: int
    seconds: float
    bytes: int
    max_abs_diff: float
    ref_max_abs: float
    tolerance: float
    peak_rss: int
    check_precision: str

    def line(self) -> str:
        return (
            f"{self.name:16s} {self.params / 1e6:9.2f} M params  {self.seconds:7.1f} s  {self.bytes / 2**20:9.1f} MiB"
            f"  max|diff| {self.max_abs_diff:.2e} (max|ref| {self.ref_max_abs:.2e}, tolerance {self.tolerance:.2e}"
            f", {self.check_precision})  peak RSS {self.peak_rss / 2**30:.2f} GiB"
        )


# diffusers' defaults for the registered pipeline flags, per class
FLAG_DEFAULTS = {
    "StableDiffusionXLPipeline": {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
    "StableDiffusionXLImg2ImgPipeline": {
        "force_zeros_for_empty_prompt": True,
        "requires_aesthetics_score": False,
    },
}


def _prepare_output(output: Path) -> Path:
    """A temporary folder beside OUTPUT (whose existence convert_pipeline has checked), proven writable."""
    output = Path(output)
    parent = safety.beside(output)
    if not parent.is_dir():
        raise ConvertError(f"{output}: parent folder {parent} does not exist")
    tmp = parent / f".{output.name}.partial-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / ".write-test").write_bytes(b"")
        (tmp / ".write-test").unlink()
    except OSError as e:
        raise ConvertError(f"{output}: cannot write there ({e.strerror or e})") from None
    return tmp


def convert_pipeline(
    source: str,
    output: Path,
    weight_format: str = "fp16",
    overwrite: bool = False,
    config: str | None = None,
    log: Callable[[str], None] = print,
    isolate: bool = True,
    loras: list[tuple[str, float]] | None = None,
    scheduler: str | None = None,
    timestep_dtype: str = "f32",
    quantize_unet: str | None = None,
    calibration=None,
    inputs: list[tuple[str, str]] = (),
    tiny_vae: str | None = None,
) -> Path:
    """isolate: each component's tracing and each IR's check run in a child process (the peak memory of the
    conversion is then that of its largest step); tests of tiny models turn it off for speed.
    quantize_unet: "int8" or "hybrid" (convert.quantize), calibrated as `calibration` (a quantize.Calibration)
    says; the UNet is then traced in fp16 (fp32 with weight_format fp32), weight_format applies to the rest.
    inputs: (what, path) of other files read (e.g. the calibration prompts), refused inside OUTPUT like the source.
    tiny_vae: a diffusers AutoencoderTiny folder or hub id (TAESDXL: madebyollin/taesdxl) converted beside the VAE
    as vae_encoder_tiny/ and vae_decoder_tiny/, with the same check against torch.

    Nothing the user has is destroyed: the source, --config, LoRAs and inputs are refused inside OUTPUT (and OUTPUT
    inside them); OUTPUT is locked for the whole conversion; the folder is written beside it and moved into place
    only if OUTPUT is still what was checked (convert.safety); the leftovers of killed conversions are cleaned."""
    output = Path(output)
    others = [("the LoRA", str(f)) for f, _ in loras or []] + list(inputs) + [("the --tiny-vae folder", tiny_vae)]
    safety.check_paths(source, output, config, others)
    if quantize_unet:  # bad settings fail before the heavy imports too
        from convert import quantize

        if quantize_unet not in quantize.MODES:
            raise ConvertError(f"--quantize-unet {quantize_unet!r}: choose one of {', '.join(quantize.MODES)}")
        calibration = calibration or quantize.Calibration()
        quantize.check_settings(calibration)
    src = resolve(source, config)  # bad input fails here, before the heavy imports
    if tiny_vae is not None:
        _check_tiny_vae(tiny_vae, src)
    lock = safety.OutputLock(output)  # a second conversion to OUTPUT fails here, before any work
    try:
        for line in cleanup_stale(safety.beside(output), output.name):  # what killed conversions left
            log(line)
        if os.path.lexists(output) and not overwrite:
            raise ConvertError(f"{output} exists; pass --overwrite to replace it")
        return _convert(src, output, weight_format, overwrite, log, isolate, loras, scheduler, timestep_dtype,
                        quantize_unet, calibration, tiny_vae)  # fmt: skip
    finally:
        lock.release()


def _check_tiny_vae(location: str, src) -> None:
    """--tiny-vae is an AutoencoderTiny in the pipeline VAE's latent space (a local source's config is at hand:
    checked now; otherwise when the tiny VAE is traced, against the converted VAE's config)."""
    from convert.component import read_tiny_vae_config, tiny_vae_factor

    tiny = read_tiny_vae_config(location)
    vae_config = Path(src.location) / "vae" / "config.json"
    if src.kind != "folder" or not vae_config.is_file():
        return
    try:
        vae = json.loads(vae_config.read_text())
    except (OSError, ValueError):
        return  # the VAE's own conversion reports it
    channels, want = tiny.get("latent_channels", 4), vae.get("latent_channels", 4)
    factor, want_factor = tiny_vae_factor(tiny), 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    if channels != want or factor != want_factor:
        raise ConvertError(f"--tiny-vae {location}: {channels} latent channels at 1/{factor} scale, {src.location}'s "
                           f"VAE has {want} at 1/{want_factor}: not its latent space")  # fmt: skip


def _convert(src, output: Path, weight_format, overwrite, log, isolate, loras, scheduler, timestep_dtype,
             quantize_unet, calibration, tiny_vae=None) -> Path:  # fmt: skip
    """convert_pipeline under the OUTPUT lock: the checks that need the libraries, then the work."""
    from dataclasses import asdict

    import torch

    from convert import component
    from convert.tokenizers import convert_tokenizer

    component.quiet_libraries()
    loader = Loader(src, torch.float16 if weight_format == "fp16" else torch.float32)
    if src.kind != "single-file" or src.config_dir is not None:  # the config is at hand: check it before any work
        _checked_scheduler(loader.scheduler_config(), scheduler, f"{src.config_dir or src.location}: scheduler config")
    elif scheduler:
        _swap_scheduler({"_class_name": "EulerDiscreteScheduler"}, scheduler)  # unknown names fail before work
    check_single_file(src)  # tensor shapes from the file's header, before anything is loaded
    if loras:
        from convert.lora import check_loras

        # files exist, scales are numbers, keys and shapes fit the models: before any output is written
        check_loras(loras, components=src.components, source=src)
    tmp = _prepare_output(output)
    t_start = time.perf_counter()
    # A single file is loaded once as a whole pipeline, so its components are converted in this process.
    isolate = isolate and src.kind != "single-file"
    try:
        results = {}
        log(f"converting {src.location} ({src.kind}, {src.model_index['_class_name']}) -> {output}, {weight_format}")
        for name in ("tokenizer", "tokenizer_2"):
            if name in src.components:
                t0 = time.perf_counter()
                convert_tokenizer(loader.tokenizer_dir(name), tmp / name)
                size = sum(f.stat().st_size for f in (tmp / name).iterdir())
                log(f"{name:16s} {'':9s}           {time.perf_counter() - t0:7.1f} s  {size / 2**20:9.1f} MiB")
        pooled_dim = None
        for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
            if name not in src.components:
                continue
            fmt = weight_format
            if name == "unet" and quantize_unet:  # quantized after calibration, from full-precision weights
                fmt = "fp32" if weight_format == "fp32" else "fp16"
            args = {"source": asdict(src), "name": name, "tmp": str(tmp), "weight_format": fmt,
                    "pooled_dim": pooled_dim, "loras": [[str(f), float(sc)] for f, sc in loras or []],
                    "timestep_dtype": timestep_dtype}  # fmt: skip
            traced = component.run("trace", args, isolate, loader if src.kind == "single-file" else None)
            pooled_dim = traced.pop("pooled_dim", pooled_dim)
            results |= _checked(traced, tmp, fmt, isolate, log)
            gc.collect()
        if tiny_vae is not None:  # beside the VAE, whose written config.json it is checked against
            args = {"location": tiny_vae, "tmp": str(tmp), "weight_format": weight_format}
            results |= _checked(component.run("trace_tiny_vae", args, isolate), tmp, weight_format, isolate, log)

        (tmp / "scheduler").mkdir()
        # untouched, unless another scheduler is asked for; a single file's config is only known once loaded
        sched = _checked_scheduler(loader.scheduler_config(), scheduler, f"{src.location}: scheduler config")
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index = dict(src.model_index)
        for flag, default in FLAG_DEFAULTS.get(index["_class_name"], {}).items():
            index.setdefault(flag, default)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        quantization = _quantize_unet(tmp, quantize_unet, calibration, isolate, log) if quantize_unet else None
        info = {
            "weight_format": weight_format,
            "timestep_dtype": timestep_dtype,
            "source": src.location,
            "loras": [[str(f), float(sc)] for f, sc in loras or []],
            "tiny_vae": tiny_vae,
            "versions": _versions(),
            "submodels": {ir: asdict(r) for ir, r in results.items()},
            "unet_quantization": quantization,
        }  # fmt: skip
        (tmp / "convert_info.json").write_text(json.dumps(info, indent=2))
        safety.move_into_place(tmp, output, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {time.perf_counter() - t_start:.1f} s: {output}")
    return output


def _checked(traced: dict, tmp: Path, fmt: str, isolate: bool, log) -> dict[str, Result]:
    """Each traced IR read back and compared with torch (convert.check): its Result, logged."""
    from convert import component

    trace_rss = traced.pop("peak_rss")
    results = {}
    for ir, facts in traced.items():
        args = {"name": ir, "out_dir": str(tmp / ir), "weight_format": fmt, "params": facts["params"]}
        checked = component.run("check", args, isolate)
        r = Result(ir, facts["params"], facts["seconds"] + checked["check_seconds"], checked["bytes"],
                   checked["max_abs_diff"], checked["ref_max_abs"], checked["tolerance"],
                   max(trace_rss, checked["peak_rss"]), checked["check_precision"])  # fmt: skip
        results[ir] = r
        log(r.line())
    return results


def _checked_scheduler(config: dict, scheduler: str | None, where: str) -> dict:
    """The scheduler config to write (another scheduler's if asked), its values checked before and after."""
    check_scheduler_config(config, where)
    if scheduler:
        config = _swap_scheduler(config, scheduler)
        check_scheduler_config(config, f"{where} as --scheduler {scheduler}")
    return config


def _quantize_unet(tmp: Path, mode: str, calibration, isolate: bool, log) -> dict:
    """Calibrate on the complete folder in tmp, quantize its UNet, then report the quantized folder against the
    unquantized one (a folder of links to tmp's other submodels); -> the facts convert_info.json keeps."""
    from dataclasses import asdict

    from convert import component, quantize

    work = tmp.parent / f"{tmp.name}.quantize"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    cal = asdict(calibration)
    try:
        args = {"model_dir": str(tmp), "out_file": str(work / "samples.npz"), "calibration": cal}
        calibrated = component.run("calibrate", args, isolate)
        log(f"calibration     {calibrated['samples']} UNet calls from {calibrated['generations']} generations, "
            f"{calibrated['steps']} steps at {calibrated['height']}x{calibrated['width']}  "
            f"{calibrated['seconds']:7.1f} s  peak RSS {calibrated['peak_rss'] / 2**30:.2f} GiB")  # fmt: skip
        args = {"xml": str(tmp / "unet" / "openvino_model.xml"), "samples": str(work / "samples.npz"), "mode": mode,
                "out_xml": str(work / "unet" / "openvino_model.xml")}  # fmt: skip
        quantized = component.run("quantize", args, isolate)
        (work / "samples.npz").unlink()
        size = sum(f.stat().st_size for f in (work / "unet").glob("openvino_model.*"))
        log(f"unet {mode:10s} {quantized['ops']['FakeQuantize']} FakeQuantize, {quantized['ops']['int8_constants']} "
            f"int8 constants  {quantized['seconds']:7.1f} s  {size / 2**20:9.1f} MiB  "
            f"peak RSS {quantized['peak_rss'] / 2**30:.2f} GiB")  # fmt: skip
        reference = work / "reference"  # tmp as it was: links to its submodels, and the unquantized UNet
        reference.mkdir()
        for entry in tmp.iterdir():
            if entry.name != "unet":
                (reference / entry.name).symlink_to(entry.resolve())
        shutil.copy(tmp / "unet" / "config.json", work / "unet" / "config.json")
        (tmp / "unet").rename(reference / "unet")
        (work / "unet").rename(tmp / "unet")
        facts = {"mode": mode, "calibration": calibrated, "quantize": quantized, "ir_bytes": size}
        if calibration.report_samples:
            log(f"fidelity report: {calibration.report_samples} generation(s), quantized vs unquantized UNet")
            args = {"quantized": str(tmp), "reference": str(reference), "calibration": cal}
            facts["fidelity"] = component.run("report", args, isolate)
            s = facts["fidelity"]["summary"]
            log(f"fidelity        mean PSNR {s['mean_psnr_db']:.2f} dB (min {s['min_psnr_db']:.2f}), "
                f"max latents relative error {s['max_latents_rel_error']:.4f}")  # fmt: skip
        quantize.write_report(tmp, facts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return facts


def _swap_scheduler(config: dict, name: str) -> dict:
    """The folder's scheduler config as `Scheduler.from_config(config)` of another class writes it (e.g. the
    LCMScheduler that an LCM-LoRA such as VegaRT's needs)."""
    import diffusers

    from schedulers import SCHEDULER_NAMES, resolve_name

    try:
        cls_name, overrides = resolve_name(name)
    except ValueError:
        raise ConvertError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULER_NAMES)}") from None
    cls = getattr(diffusers, cls_name)
    return dict(cls.from_config(config, **overrides).config, _class_name=cls_name)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("openvino", "openvino-tokenizers", "torch", "diffusers", "transformers", "nncf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
