"""python -m convert SOURCE OUTPUT: an SDXL-family checkpoint -> an OpenVINO model folder, one IR per submodel."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert.errors import ConvertError

EPILOG = """
weight formats:
  fp16  weights stored as f16 (default); OpenVINO computes in f32/bf16 as the device prefers
  fp32  weights stored as f32 (parity tests)
  int8  NNCF 8-bit asymmetric weight compression of every MatMul/Convolution/Embedding
  int4  the UNet's MatMul weights in NNCF 4-bit symmetric groups of 64 (16-32 where 64 does not divide the
        channels); its convolutions, embeddings and last layer, the text encoders and the VAE in int8

UNet quantization (--quantize-unet, NNCF post-training, calibrated on the runtime's own denoising steps):
  int8    weights and activations of every Convolution and MatMul in int8 (transformer model type), except
          conv_in, conv_out and up_blocks.2.resnets.2.conv_shortcut, kept in higher precision
  hybrid  optimum-intel's hybrid mode: MatMul and embedding weights int8-compressed (weight-only); weights and
          activations quantized in the convolutions and in the MatMuls between activations (attention)
  --weight-format then applies to the text encoders and the VAE. Calibration runs the pipeline --calibration-size
  UNet calls long (evenly spaced steps of each prompt); a fidelity report (quantization_report.json) compares
  generations of the quantized and the unquantized UNet.

examples:
  python -m convert ./stable-diffusion-xl-base-1.0 ./sdxl-base-ov
  python -m convert ./sd_xl_base_1.0.safetensors ./sdxl-base-ov --config ./sdxl-base-diffusers-configs
  python -m convert stabilityai/stable-diffusion-xl-base-1.0 ./sdxl-base-ov --weight-format int8
  python -m convert ./segmind-vega ./vega-int8 --quantize-unet int8 --calibration-size 128
  python -m convert ./stable-diffusion-xl-base-1.0 ./sdxl-base-ov --tiny-vae madebyollin/taesdxl
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert an SDXL-family checkpoint (diffusers folder, single .safetensors file or hub id) "
        "into an OpenVINO model folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="diffusers folder (model_index.json), .safetensors file, or hub id")
    p.add_argument("output", type=Path, help="the model folder to write (must not exist unless --overwrite)")
    p.add_argument("--weight-format", choices=["fp16", "fp32", "int8", "int4"], default="fp16")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--config", help="single-file source: a diffusers folder (or hub id) to take the configs from")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse a LoRA (diffusers/PEFT or kohya keys) into the UNet and text encoders before tracing; "
                   "repeatable; SCALE defaults to 1.0")  # fmt: skip
    p.add_argument("--scheduler", default=None,
                   help="write this scheduler's config instead of the source's (lcm after an LCM-LoRA)")  # fmt: skip
    p.add_argument("--timestep-dtype", choices=["f32", "i64"], default="f32",
                   help="the UNet's timestep input: f32 keeps fractional (Karras) timesteps exact; i64 is what "
                   "optimum-intel exports and openvino.genai feeds, for folders other pipelines load")  # fmt: skip
    p.add_argument("--tiny-vae", metavar="SRC", default=None,
                   help="also convert a tiny autoencoder (diffusers AutoencoderTiny folder or hub id; "
                   "madebyollin/taesdxl for the SDXL family) into vae_decoder_tiny/ and vae_encoder_tiny/, for "
                   "`--vae-decoder tiny` and `--preview tiny` at generation")  # fmt: skip
    q = p.add_argument_group("UNet quantization")
    q.add_argument("--quantize-unet", choices=["int8", "hybrid"], default=None)
    q.add_argument("--calibration-prompts", metavar="FILE", default=None,
                   help="prompts, one per line (default: a built-in list of 24 varied prompts)")  # fmt: skip
    q.add_argument("--calibration-size", type=int, default=None, metavar="N",
                   help="UNet calls to record for calibration (default 64)")  # fmt: skip
    q.add_argument("--calibration-steps", type=int, default=None, metavar="N",
                   help="denoising steps per calibration prompt (default: 4 for LCM models, else 20)")  # fmt: skip
    q.add_argument(
        "--calibration-resolution",
        default=None,
        metavar="HxW",
        help="image size of the calibration generations (default: the model's, 1024x1024 for SDXL)",
    )
    q.add_argument("--report-samples", type=int, default=None, metavar="N",
                   help="generations in the fidelity report (default 3; 0: no report)")  # fmt: skip
    return p.parse_args(argv)


def calibration_from_args(args: argparse.Namespace):
    """-> a convert.quantize.Calibration, or None without --quantize-unet (whose options then are an error)."""
    given = [f"--{k.replace('_', '-')}" for k in ("calibration_prompts", "calibration_size", "calibration_steps",
             "calibration_resolution", "report_samples") if getattr(args, k) is not None]  # fmt: skip
    if args.quantize_unet is None:
        if given:
            raise ConvertError(f"{given[0]} needs --quantize-unet int8|hybrid")
        return None
    from convert.quantize import Calibration, read_prompts

    cal = Calibration(prompts=read_prompts(args.calibration_prompts))
    if args.calibration_size is not None:
        cal.size = args.calibration_size
    cal.steps = args.calibration_steps
    if args.report_samples is not None:
        cal.report_samples = args.report_samples
    if args.calibration_resolution:
        h, sep, w = args.calibration_resolution.lower().partition("x")
        try:
            cal.height, cal.width = int(h), int(w if sep else h)
        except ValueError:
            raise ConvertError(f"--calibration-resolution {args.calibration_resolution!r}: expected HxW, "
                               "e.g. 512x512") from None  # fmt: skip
    return cal


def parse_lora(spec: str) -> tuple[str, float]:
    path, sep, scale = spec.rpartition(":")
    if not sep or "/" in scale or "\\" in scale:
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise ConvertError(f"--lora {spec}: scale {scale!r} is not a number") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from convert.pipeline import convert_pipeline

        calibration = calibration_from_args(args)
        convert_pipeline(
            quantize_unet=args.quantize_unet,
            calibration=calibration,
            loras=[parse_lora(s) for s in args.lora],
            source=args.source,
            output=args.output,
            weight_format=args.weight_format,
            overwrite=args.overwrite,
            config=args.config,
            scheduler=args.scheduler,
            timestep_dtype=args.timestep_dtype,
            inputs=[("the calibration prompts", args.calibration_prompts)],
            tiny_vae=args.tiny_vae,
            log=print,
        )
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
