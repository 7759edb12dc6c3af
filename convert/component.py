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

# component -> the IR folders it becomes
IRS = {"text_encoder": ["text_encoder"], "text_encoder_2": ["text_encoder_2"], "unet": ["unet"],
       "vae": ["vae_encoder", "vae_decoder"]}  # fmt: skip


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
        if model.config.in_channels != 4:
            raise ConvertError(f"{src.location}: UNet has {model.config.in_channels} input channels; "
                               "only 4 (text-to-image) is supported")  # fmt: skip
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


def _task(what: str, args: dict, loader=None) -> dict:
    """One stage of a conversion: trace, check, or (convert.quantize) calibrate, quantize, report."""
    if what == "trace":
        return trace_component(args["source"], args["name"], Path(args["tmp"]), args["weight_format"],
                               args["pooled_dim"], loader, args.get("loras"),
                               args.get("timestep_dtype", "f32"))  # fmt: skip
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
            if what == "trace":
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
