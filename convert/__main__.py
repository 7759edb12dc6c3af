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

examples:
  python -m convert ./stable-diffusion-xl-base-1.0 ./sdxl-base-ov
  python -m convert ./sd_xl_base_1.0.safetensors ./sdxl-base-ov --config ./sdxl-base-diffusers-configs
  python -m convert stabilityai/stable-diffusion-xl-base-1.0 ./sdxl-base-ov --weight-format int8
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
    return p.parse_args(argv)


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

        convert_pipeline(
            loras=[parse_lora(s) for s in args.lora],
            source=args.source,
            output=args.output,
            weight_format=args.weight_format,
            overwrite=args.overwrite,
            config=args.config,
            scheduler=args.scheduler,
            timestep_dtype=args.timestep_dtype,
            log=print,
        )
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
