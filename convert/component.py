"""Convert one component (load, trace, save, write its config), in this process or in a child process.

A child per component and per check is how the converter keeps its peak memory to the largest single step:
memory torch and OpenVINO free inside a process is not all returned to the system.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from convert.check import PeakRSS, check
from convert.errors import ConvertError

# component -> the IR folders it becomes ("tiny_vae": --tiny-vae, a diffusers AutoencoderTiny such as TAESDXL)
IRS = {"text_encoder": ["text_encoder"], "text_encoder_2": ["text_encoder_2"], "unet": ["unet"],
       "vae": ["vae_encoder", "vae_decoder"], "tiny_vae": ["vae_encoder_tiny", "vae_decoder_tiny"]}  # fmt: skip


def trace_component(source: dict, name: str, tmp: Path, weight_format: str, pooled_dim: int | None,
                    loader=None, loras: list | None = None, timestep_dtype: str = "f32") -> dict:  # fmt: skip
    """Load `name` from the source (or `loader`) and write its IR(s) + config.json into tmp; -> trace facts."""
    import torch

    from convert import export, wrappers
    from convert.source import Loader, Source

    src = Source(**source)
    # f16 storage: the UNet is loaded in fp16 (half the memory while tracing); the rest is small and loads in
    # fp32 (SDXL's VAE overflows in fp16).
    dtype = torch.float16 if (name == "unet" and weight_format == "fp16") else torch.float32
    model = (loader or Loader(src, dtype)).load(name)
    if loras and name != "vae":  # fused in fp32, before any cast to the storage dtype
        from convert.lora import apply_loras

        model = apply_loras(name, model.float(), [(Path(f), float(s)) for f, s in loras])
    if next(model.parameters()).dtype != dtype:  # a single file's pipeline is loaded once, in one dtype
        model = model.to(dtype)
    facts: dict = {}
    if name == "text_encoder":
        specs = {"text_encoder": wrappers.text_encoder_spec(model)}
    elif name == "text_encoder_2":
        specs = {"text_encoder_2": wrappers.text_encoder_2_spec(model)}
        facts["pooled_dim"] = model.config.projection_dim
    elif name == "unet":
        if model.config.in_channels not in (4, 9):
            raise ConvertError(f"{src.location}: UNet has {model.config.in_channels} input channels; "
                               "4 (text-to-image) or 9 (inpainting) are supported")  # fmt: skip
        specs = {"unet": wrappers.unet_spec(model, pooled_dim, timestep_dtype=timestep_dtype)}
    else:
        specs = {"vae_encoder": wrappers.vae_encoder_spec(model), "vae_decoder": wrappers.vae_decoder_spec(model)}
    for ir, spec in specs.items():
        facts[ir] = export.trace(spec, tmp / ir, weight_format)
        if name.startswith("text_encoder"):
            model.config.save_pretrained(tmp / ir)
        else:
            model.save_config(tmp / ir)
    return facts


def read_tiny_vae_config(location: str) -> dict:
    """--tiny-vae's config.json (a local folder, else a hub id), checked to be a diffusers AutoencoderTiny: before
    any work, no torch needed."""
    path = Path(location)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConvertError(f"--tiny-vae {location}: no config.json (not a diffusers AutoencoderTiny folder)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ConvertError(f"--tiny-vae {location}: no weights file (partial download?)")
        config_file = path / "config.json"
    elif path.exists() or location.startswith((".", "/")) or location.count("/") != 1:
        raise ConvertError(f"--tiny-vae {location}: not a diffusers AutoencoderTiny folder or a hub id (org/name)")
    else:
        try:
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(location, "config.json"))
        except Exception as e:  # no network here; a user with internet gets madebyollin/taesdxl
            raise ConvertError(f"--tiny-vae {location}: could not fetch config.json from the hub "
                               f"({type(e).__name__})") from None  # fmt: skip
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"--tiny-vae {config_file}: unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderTiny":
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise ConvertError(f"--tiny-vae {location}: a {found}, not a diffusers AutoencoderTiny (TAESD/TAESDXL)")
    return config


def tiny_vae_factor(config: dict) -> int:
    """Pixels per latent of an AutoencoderTiny config: upsampling_scaling_factor ** (decoder blocks - 1)."""
    blocks = config.get("decoder_block_out_channels", [64, 64, 64, 64])
    return int(config.get("upsampling_scaling_factor", 2)) ** (len(blocks) - 1)


def trace_tiny_vae(location: str, tmp: Path, weight_format: str) -> dict:
    """Load --tiny-vae (an AutoencoderTiny) and write vae_encoder_tiny/ and vae_decoder_tiny/ (IR + config.json)
    into tmp, beside the pipeline's VAE, whose latent space it must share (channels and factor checked)."""
    import torch
    from diffusers import AutoencoderTiny

    from convert import export, wrappers

    pipeline_vae = json.loads((tmp / "vae_decoder" / "config.json").read_text())
    try:
        model, info = AutoencoderTiny.from_pretrained(location, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"--tiny-vae {location}: cannot load: {first}") from None
    bad = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    if bad:
        raise ConvertError(f"--tiny-vae {location}: weights do not match its config ({len(bad)} keys, first: {bad[0]})")
    channels, want = model.config.latent_channels, pipeline_vae.get("latent_channels", 4)
    factor, want_factor = tiny_vae_factor(model.config), 2 ** (len(pipeline_vae.get("block_out_channels", [0] * 4)) - 1)
    if channels != want or factor != want_factor:
        raise ConvertError(f"--tiny-vae {location}: {channels} latent channels at 1/{factor} scale, the pipeline's "
                           f"VAE has {want} at 1/{want_factor}: not its latent space")  # fmt: skip
    model = model.eval()
    facts: dict = {}
    specs = {"vae_encoder_tiny": wrappers.tiny_vae_encoder_spec(model),
             "vae_decoder_tiny": wrappers.tiny_vae_decoder_spec(model)}  # fmt: skip
    for ir, spec in specs.items():
        facts[ir] = export.trace(spec, tmp / ir, weight_format)
        model.save_config(tmp / ir)
    return facts


def _task(what: str, args: dict, loader=None) -> dict:
    """One stage of a conversion: trace, check, or (convert.quantize) calibrate, quantize, report."""
    if what == "trace":
        return trace_component(args["source"], args["name"], Path(args["tmp"]), args["weight_format"],
                               args["pooled_dim"], loader, args.get("loras"),
                               args.get("timestep_dtype", "f32"))  # fmt: skip
    if what == "trace_tiny_vae":
        return trace_tiny_vae(args["location"], Path(args["tmp"]), args["weight_format"])
    if what == "check":
        return check(args["name"], Path(args["out_dir"]), args["weight_format"], args["params"])
    from convert import quantize

    if what == "calibrate":
        return quantize.calibrate(Path(args["model_dir"]), Path(args["out_file"]), args["calibration"])
    if what == "quantize":
        return quantize.quantize(Path(args["xml"]), Path(args["samples"]), args["mode"], Path(args["out_xml"]))
    if what == "report":
        return quantize.report(Path(args["quantized"]), Path(args["reference"]), args["calibration"])
    raise ValueError(f"unknown stage {what!r}")


def _child(argv: list[str]) -> int:
    """python -m convert.component trace|check|calibrate|quantize|report ARGS_JSON RESULT_JSON"""
    what, args, result_path = argv[0], json.loads(argv[1]), Path(argv[2])
    try:
        with PeakRSS() as rss:
            if what in ("trace", "trace_tiny_vae"):
                quiet_libraries()
            result = _task(what, args)
        result["peak_rss"] = rss.peak
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result_path.write_text(json.dumps(result))
    return 0


def run(what: str, args: dict, isolate: bool, loader=None) -> dict:
    """Run one stage, in a child process when `isolate`; ConvertError either way."""
    if not isolate:
        with PeakRSS() as rss:
            result = _task(what, args, loader)
        result["peak_rss"] = rss.peak
        return result
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        proc = subprocess.run([sys.executable, "-m", "convert.component", what, json.dumps(args), str(out)],
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
        if proc.returncode != 0 or not out.is_file():
            errors = [line[7:] for line in proc.stderr.splitlines() if line.startswith("error: ")]
            if errors:
                raise ConvertError(errors[-1])
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"{what} of {args.get('name', 'the UNet')} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def quiet_libraries() -> None:
    """Our progress lines are the log; silence the libraries' bars and notices."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
