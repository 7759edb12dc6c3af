"""The SDXL VAE at real size (random weights): full, tiled and tiny decode, time and peak RSS (issue 15).

    python -m benchmarks.vae_real prepare            # SDXL VAE (benchmarks/configs) + TAESDXL-config tiny AE -> IRs
    python -m benchmarks.vae_real decode [--size 1024] [--precision bf16]
    python -m benchmarks.vae_real generate --model lcm-ssd-1b [--size 1024]   # after convert_real --tiny-vae

`prepare` builds diffusers' AutoencoderKL from the SDXL base config and AutoencoderTiny with its default config
(madebyollin/taesdxl's) with random weights, traces them through convert's wrappers and writes fp16 IRs checked
against torch into benchmarks/out/vae-real/. `decode` runs each variant in its own child process (compile, a first
call, a timed second call; peak RSS of the child), plus a 4096^3 MatMul to state the machine's speed in the same
run, and appends the records to benchmarks/results/vae_real.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import matmul_gflops, seconds
from benchmarks.memory import run_measured

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "vae-real"
RESULTS = HERE / "results" / "vae_real.jsonl"
now = time.perf_counter


def prepare(out: Path = OUT) -> None:
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from convert import export, wrappers
    from convert.check import check

    cfg = json.loads((HERE / "configs" / "sdxl-base-1.0.json").read_text())["vae"]
    torch.manual_seed(0)
    vae = AutoencoderKL(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    torch.manual_seed(1)
    tiny = AutoencoderTiny().eval()  # diffusers' defaults are TAESDXL's config
    specs = {
        "vae_decoder": (vae, wrappers.vae_decoder_spec(vae)),
        "vae_encoder": (vae, wrappers.vae_encoder_spec(vae)),
        "vae_decoder_tiny": (tiny, wrappers.tiny_vae_decoder_spec(tiny)),
        "vae_encoder_tiny": (tiny, wrappers.tiny_vae_encoder_spec(tiny)),
    }
    for name, (model, spec) in specs.items():
        facts = export.trace(spec, out / name, "fp16")
        model.save_config(out / name)
        checked = check(name, out / name, "fp16", facts["params"])
        print(f"{name:17s} {facts['params'] / 1e6:7.2f} M params, max|diff| {checked['max_abs_diff']:.2e} "
              f"(tolerance {checked['tolerance']:.2e})", flush=True)  # fmt: skip


def child(spec: dict) -> dict:
    import numpy as np
    import openvino as ov

    from benchmarks.memory import peak_rss_self
    from runtime import vae
    from runtime.ov_model import OVModel

    if spec["what"] == "matmul":
        return {"gflops": matmul_gflops(), "peak_rss": peak_rss_self()}
    if spec["what"] == "generate":
        return generate(spec)
    size, core = spec["size"], ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": spec["precision"], "CACHE_DIR": ""}
    z = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    if spec["what"] == "tiny":
        tiny = vae.TinyVAE(core, OUT, "CPU", cfg)
        t = now()
        tiny.decoder.compile({"latent_sample": z.shape})
        compile_s = now() - t
        decode = tiny.decode_float
    else:
        model = OVModel(core, OUT / "vae_decoder" / "openvino_model.xml", "CPU", cfg)

        def call(x):
            return model({"latent_sample": x})["sample"]

        compile_s = 0.0
        if spec["what"] == "tiled":
            tiles = vae.Tiles(spec["tile"], spec["tile"] // 8)

            def decode(x):  # as the pipeline: each tile shape's compiled model released after its tiles
                return vae.tiled_decode(call, x, tiles, model.release)
        else:
            if spec["what"] == "tile":  # one tile of this size alone
                z = z[:, :, : spec["tile"] // 8, : spec["tile"] // 8]
            t = now()
            model.compile({"latent_sample": z.shape})
            compile_s = now() - t
            decode = call
    t = now()
    decode(z)
    first = now() - t
    t = now()
    out = decode(z)
    second = now() - t
    return {"compile_s": compile_s, "first_call_s": first, "call_s": second, "out_shape": list(out.shape),
            "peak_rss": peak_rss_self()}  # fmt: skip


def generate(spec: dict) -> dict:
    """A whole generation of a real-size folder converted with --tiny-vae: its steps, then the final image by the
    full decoder and by the tiny one, and what a preview of one step costs (approx, tiny)."""
    import statistics

    import numpy as np

    from benchmarks.memory import peak_rss_self
    from benchmarks.real_size import PROMPT
    from runtime import vae
    from runtime.pipeline import SDXLPipeline

    size = spec["size"]
    pipe = SDXLPipeline(HERE / "out" / f"{spec['model']}-random-ov-fp16", low_memory=spec.get("low_memory", False))
    tiny = getattr(pipe, "tiny_vae", None) or vae.TinyVAE(pipe.core, pipe.dir, pipe.device, pipe.vae_decoder.config)
    kw = dict(prompt=PROMPT, height=size, width=size, seed=0, output_type="latent")
    kw |= pipe.info.presets(None, spec.get("steps"), None)
    primed = pipe(**{**kw, "num_inference_steps": 1}).latents  # compiles the text encoders and the UNet
    pipe.decode(primed)  # and both decoders at this size
    tiny.decode(primed)
    t0 = now()
    gen, marks = pipe.generate(**kw), []
    for state in gen:
        marks.append(now())
        x0 = state.denoised if state.denoised is not None else state.latents
    latents = gen.result().latents
    denoise_s = now() - t0
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)] or [marks[0] - t0]
    t = now()
    pipe.decode(latents)
    full_s = now() - t
    t = now()
    tiny.decode(latents)
    tiny_s = now() - t
    approx = [seconds(lambda: vae.approx_rgb(x0)) for _ in range(5)]
    tiny_preview = [seconds(lambda: tiny.decode(x0)) for _ in range(3)]
    step = statistics.median(steps)
    return {"steps": len(marks), "denoise_s": denoise_s, "steps_s": steps, "step_s": step, "full_decode_s": full_s,
            "tiny_decode_s": tiny_s, "per_image_full_s": denoise_s + full_s, "per_image_tiny_s": denoise_s + tiny_s,
            "preview_approx_s": statistics.median(approx), "preview_tiny_s": statistics.median(tiny_preview),
            "preview_approx_frac": statistics.median(approx) / step,
            "preview_tiny_frac": statistics.median(tiny_preview) / step,
            "latents_finite": bool(np.isfinite(latents).all()), "peak_rss": peak_rss_self()}  # fmt: skip


VARIANTS = {
    "full": {"what": "full"},
    "tiled-512": {"what": "tiled", "tile": 512},
    "tiny": {"what": "tiny"},
    "tile-512": {"what": "tile", "tile": 512},
    "tile-256": {"what": "tile", "tile": 256},
    "matmul": {"what": "matmul"},
    "generate": {"what": "generate"},
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        print("@@VAE@@ " + json.dumps(child(json.loads(argv[1]))), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.vae_real", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["prepare", "decode", "generate"])
    p.add_argument("--model", default="lcm-ssd-1b", help="generate: benchmarks/out/<model>-random-ov-fp16, converted "
                   "by `python -m benchmarks.convert_real --models <model> --tiny-vae --keep`")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="generate: default the folder's preset (LCM: 4)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=1, help="decode: run the variants this many times, interleaved")
    p.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "generate"], choices=list(VARIANTS))
    args = p.parse_args(argv)
    if args.what == "prepare":
        prepare()
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    names = ["generate"] if args.what == "generate" else args.variants * args.rounds  # interleaved rounds
    for name in names:
        spec = {**VARIANTS[name], "size": args.size, "precision": args.precision}
        if name == "generate":
            spec |= {"model": args.model, "steps": args.steps}
        cmd = [sys.executable, "-m", "benchmarks.vae_real", "_child", json.dumps(spec)]
        with tempfile.TemporaryFile("w+") as stdout:
            seconds, peak, code = run_measured(cmd, stdout=stdout)
            stdout.seek(0)
            line = next((x for x in stdout.read().splitlines() if x.startswith("@@VAE@@ ")), None)
        if code or line is None:
            print(f"{name}: failed (exit {code})", flush=True)
            continue
        rec = {"variant": name, **spec, **json.loads(line[8:]), "child_peak_rss": peak, "wall_s": seconds,
               "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
        with RESULTS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if name == "generate":
            print(
                f"{args.model} {args.size}px, {rec['steps']} steps: denoise {rec['denoise_s']:.1f} s (step "
                f"{rec['step_s']:.2f} s); per image with the full decoder {rec['per_image_full_s']:.1f} s "
                f"(decode {rec['full_decode_s']:.1f} s), with the tiny one {rec['per_image_tiny_s']:.1f} s (decode "
                f"{rec['tiny_decode_s']:.2f} s); preview per step: approx {rec['preview_approx_s'] * 1e3:.1f} ms "
                f"({rec['preview_approx_frac']:.4%} of a step), tiny {rec['preview_tiny_s']:.2f} s "
                f"({rec['preview_tiny_frac']:.1%}); peak RSS {rec['child_peak_rss'] / 2**30:.2f} GiB",
                flush=True,
            )
        elif name == "matmul":
            g = rec["gflops"]
            print(f"matmul 4096^3: numpy f32 {g['numpy_f32']:.0f} GFLOP/s, OpenVINO bf16 {g['openvino_bf16']:.0f}, "
                  f"f32 {g['openvino_f32']:.0f}", flush=True)  # fmt: skip
        else:
            print(f"{name:10s} {args.size}px {args.precision}: compile {rec['compile_s']:.1f} s, first call "
                  f"{rec['first_call_s']:.2f} s, call {rec['call_s']:.2f} s, peak RSS "
                  f"{rec['child_peak_rss'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
