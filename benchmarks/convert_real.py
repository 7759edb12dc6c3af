"""Full-size conversions with random weights: time, peak RSS and IR size per submodel.

Time and memory do not depend on weight values, so the real configs (benchmarks/configs, provenance inside)
with random weights give real cost figures. For each model: build a diffusers folder in fp16 (a child
process), convert it with `python -m convert` (another child process, measured), print and append to
benchmarks/results/convert_real.jsonl.

    python -m benchmarks.convert_real [--models sdxl-base-1.0 ssd-1b ...] [--weight-format fp16] [--keep]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.memory import run_measured

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
MODELS = ["sdxl-base-1.0", "sdxl-refiner-1.0", "ssd-1b", "segmind-vega", "lcm-ssd-1b"]
# the mid-size benchmark model (convert/tiny.py "mid": a guided UNet call of about 0.2 s at 512x512 here)
MID = "mid"


def build(name: str, out: Path) -> None:
    """Random-weight fp16 diffusers folder from benchmarks/configs/<name>.json (run in a child process)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from diffusers.schedulers import EulerDiscreteScheduler, LCMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from convert.clip_vocab import write_clip_tokenizer

    if name == MID:
        from convert.tiny import build_tiny_pipeline

        build_tiny_pipeline("mid", out)
        return
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)  # parameters are created in fp16: half the memory and disk
    strip = {k: v for k, v in cfg["unet"].items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**strip)
    vae = AutoencoderKL(**{k: v for k, v in cfg["vae"].items() if not k.startswith("_")})
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    torch.set_default_dtype(torch.float32)
    sched_cls = LCMScheduler if cfg["scheduler"]["_class_name"] == "LCMScheduler" else EulerDiscreteScheduler
    scheduler = sched_cls.from_config(cfg["scheduler"])
    tmp = out.with_name(out.name + ".tok")
    tok2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "t2", pad_token="!"))
    if cfg.get("text_encoder") is None:
        pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None,
                                                tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                                add_watermarker=False)  # fmt: skip
    else:
        torch.set_default_dtype(torch.float16)
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        torch.set_default_dtype(torch.float32)
        tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "t1", pad_token="<|endoftext|>"))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                         unet=unet, scheduler=scheduler, add_watermarker=False)  # fmt: skip
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convert_real")
    p.add_argument("--models", nargs="+", default=MODELS, choices=[*MODELS, MID])
    p.add_argument("--weight-format", default="fp16", choices=["fp16", "fp32", "int8", "int4"])
    p.add_argument("--timestep-dtype", default="f32", choices=["f32", "i64"],
                   help="i64: folders openvino.genai and optimum-intel load (benchmarks.run's anchors)")  # fmt: skip
    p.add_argument("--work", type=Path, default=HERE / "out", help="where the random-weight models go")
    p.add_argument("--keep", action="store_true", help="keep the built and converted folders")
    p.add_argument("--tiny-vae", action="store_true",
                   help="also convert a random-weight AutoencoderTiny of TAESDXL's config (--tiny-vae)")  # fmt: skip
    args = p.parse_args(argv)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    for name in args.models:
        suffix = "-i64" if args.timestep_dtype == "i64" else ""
        src, ov_dir = args.work / f"{name}-random", args.work / f"{name}-random-ov-{args.weight_format}{suffix}"
        if not (src / "model_index.json").is_file():
            t0 = time.perf_counter()
            subprocess.check_call([sys.executable, "-c", f"from benchmarks.convert_real import build; from pathlib "
                                   f"import Path; build({name!r}, Path({str(src)!r}))"])  # fmt: skip
            print(f"{name}: built random-weight fp16 folder in {time.perf_counter() - t0:.0f} s")
        shutil.rmtree(ov_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "convert", str(src), str(ov_dir), "--weight-format", args.weight_format,
               "--timestep-dtype", args.timestep_dtype]  # fmt: skip
        if args.tiny_vae:
            tiny = args.work / "taesdxl-random"
            if not (tiny / "config.json").is_file():
                subprocess.check_call([sys.executable, "-c", "from convert.tiny import build_tiny_autoencoder; "
                                       f"from pathlib import Path; build_tiny_autoencoder(Path({str(tiny)!r}), "
                                       "config={})"])  # fmt: skip
            cmd += ["--tiny-vae", str(tiny)]
        seconds, peak, code = run_measured(cmd)
        if code != 0:
            print(f"{name}: conversion failed with exit code {code}")
            return code
        info = json.loads((ov_dir / "convert_info.json").read_text())
        record = {"model": name, "weight_format": args.weight_format, "seconds": round(seconds, 1),
                  "peak_rss_bytes": peak, "submodels": info["submodels"],
                  "versions": info["versions"],
                  "cpu": platform.processor() or platform.machine(),
                  "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
        with open(results / "convert_real.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{name}: {seconds:.0f} s in all")
        for sub, r in info["submodels"].items():
            print(f"  {sub:15s} {r['params'] / 1e6:8.1f} M params {r['seconds']:7.1f} s "
                  f"{r['bytes'] / 2**30:6.2f} GiB on disk  peak RSS {r['peak_rss'] / 2**30:5.2f} GiB")  # fmt: skip
        if not args.keep:
            shutil.rmtree(ov_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
