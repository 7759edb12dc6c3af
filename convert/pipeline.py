"""Convert a whole pipeline, one submodel at a time, into a temporary folder renamed when complete."""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from convert.errors import ConvertError
from convert.source import Loader, resolve

# diffusers' defaults for the registered pipeline flags, per class
FLAG_DEFAULTS = {
    "StableDiffusionXLPipeline": {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
    "StableDiffusionXLImg2ImgPipeline": {
        "force_zeros_for_empty_prompt": True,
        "requires_aesthetics_score": False,
    },
}


def _prepare_output(output: Path, overwrite: bool) -> Path:
    output = Path(output)
    if output.exists() and not overwrite:
        raise ConvertError(f"{output} exists; pass --overwrite to replace it")
    parent = output.resolve().parent
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


def _finish(tmp: Path, output: Path) -> None:
    output = Path(output)
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_pipeline(
    source: str,
    output: Path,
    weight_format: str = "fp16",
    overwrite: bool = False,
    config: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    import openvino as ov
    import torch

    from convert import export, wrappers
    from convert.tokenizers import convert_tokenizer

    _quiet_libraries()
    src = resolve(source, config)
    tmp = _prepare_output(Path(output), overwrite)
    t_start = time.perf_counter()
    try:
        core = ov.Core()
        # f16 storage: load the UNet in fp16 (half the memory while tracing); everything else is small and is
        # checked in fp32 (SDXL's VAE overflows in fp16).
        unet_dtype = torch.float16 if weight_format == "fp16" else torch.float32
        loader = Loader(src, torch.float32)
        results = []
        log(f"converting {src.location} ({src.kind}, {src.model_index['_class_name']}) -> {output}, {weight_format}")
        for name in ("tokenizer", "tokenizer_2"):
            if name in src.components:
                t0 = time.perf_counter()
                convert_tokenizer(loader.tokenizer_dir(name), tmp / name)
                size = sum(f.stat().st_size for f in (tmp / name).iterdir())
                log(f"{name:15s} {'':9s}           {time.perf_counter() - t0:7.1f} s  {size / 2**20:9.1f} MiB")

        def run(name: str, spec, config_writer):
            result = export.export(name, spec, tmp / name, weight_format, core)
            config_writer(tmp / name)
            results.append(result)
            log(result.line())

        pooled_dim = None
        for name, make_spec in (
            ("text_encoder", wrappers.text_encoder_spec),
            ("text_encoder_2", wrappers.text_encoder_2_spec),
        ):
            if name not in src.components:
                continue
            model = loader.load(name)
            if name == "text_encoder_2":
                pooled_dim = model.config.projection_dim
            run(name, make_spec(model), model.config.save_pretrained)
            del model
            gc.collect()

        loader.dtype = unet_dtype
        unet = loader.load("unet")
        loader.dtype = torch.float32
        if unet.config.in_channels != 4:
            raise ConvertError(
                f"{source}: UNet has {unet.config.in_channels} input channels; only 4 (text2img) is supported"
            )
        run("unet", wrappers.unet_spec(unet, pooled_dim), unet.save_config)
        del unet
        gc.collect()

        vae = loader.load("vae")
        run("vae_encoder", wrappers.vae_encoder_spec(vae), vae.save_config)
        run("vae_decoder", wrappers.vae_decoder_spec(vae), vae.save_config)
        del vae
        gc.collect()

        (tmp / "scheduler").mkdir()
        sched = loader.scheduler_config()  # untouched
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index = dict(src.model_index)
        for flag, default in FLAG_DEFAULTS.get(index["_class_name"], {}).items():
            index.setdefault(flag, default)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        info = {
            "weight_format": weight_format,
            "source": src.location,
            "versions": _versions(),
            "submodels": {r.name: {"params": r.params, "seconds": round(r.seconds, 2), "bytes": r.bytes_on_disk,
                                   "max_abs_diff": r.max_abs_diff, "tolerance": r.tolerance} for r in results},
        }  # fmt: skip
        (tmp / "convert_info.json").write_text(json.dumps(info, indent=2))
        _finish(tmp, Path(output))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {time.perf_counter() - t_start:.1f} s: {output}")
    return Path(output)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("openvino", "openvino-tokenizers", "torch", "diffusers", "transformers", "nncf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _quiet_libraries() -> None:
    """Our progress lines are the log; silence the libraries' bars and notices."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
