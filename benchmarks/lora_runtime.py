"""LoRA at run time vs fused at conversion (never a timed test).

python -m benchmarks.lora_runtime [--rank 16] [--size 512] [--steps 4] [--precision bf16] [--rounds 3] [--genai]
    the mid-size model (convert/tiny.py "mid"), everything built here;
python -m benchmarks.lora_runtime --folder DIR [--fused DIR] [--lora F --lora F] [--genai --genai-lora F] ...
    a converted folder (e.g. real-size random weights): load / switch / compile / RSS figures, then the
    configurations in turn, one compiled UNet at a time, interleaved for --rounds rounds;
python -m benchmarks.lora_runtime --folder DIR --fused DIR --lora F --compare A,B[,C...] [--genai-lora F] ...
    configurations kept compiled and alternated generation by generation (A B, B A, ...), or call by call
    (--unet-calls): the form that survives this machine's changes of speed best; NAME#2 is an A/A control.

Per-UNet-call medians of a generation (denoiser.call_seconds, first call dropped; openvino.genai: its own
timers, the mean of the calls after the first). Configurations:
- plain: the folder, no adapter ever loaded (the code path of a pipeline without LoRA);
- disabled: adapters loaded, then disable_lora() (zero tensors on the LoRA variant);
- active: the LoRA at run time (runtime/lora.py: branches with their A and B as inputs);
- fused: the same LoRA fused into a folder converted with --lora;
- fuse_lora (--compare only): the same LoRA fused at run time (pipe.fuse_lora(), runtime/lora_fuse.py);
- openvino.genai plain / active: its Text2ImagePipeline (static shapes) on the same model (an i64-timestep
  folder: the --fused one in the folder modes), with the same LoRA as a kohya file in an AdapterConfig.
The LoRA: PEFT keys, rank R on the UNet's attention and feed-forward layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import seconds

ATTN_FF = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _make_lora(src: Path, path: Path, rank: int, seed: int) -> Path:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(src / "unet")
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(ATTN_FF):
            r = min(rank, *m.weight.shape)
            layers[f"{name}.lora_A.weight"] = torch.randn(r, m.weight.shape[1], generator=g) * 0.01
            layers[f"{name}.lora_B.weight"] = torch.randn(m.weight.shape[0], r, generator=g) * 0.01
    names = sorted({k.rsplit(".lora_", 1)[0] for k in layers})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names)
    StableDiffusionXLPipeline.save_lora_weights(path.parent, weight_name=path.name, unet_lora_layers=layers,
                                                unet_lora_adapter_metadata=config.to_dict())  # fmt: skip
    return path


def _as_kohya(path: Path, out: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    sd, kohya = load_file(str(path)), {}
    for key, value in sd.items():
        module, _, role = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if role == "A.weight" else f"{name}.lora_up.weight"] = value
        if role == "A.weight":
            kohya[f"{name}.alpha"] = np.array(value.shape[0], np.float32)
    save_file(kohya, str(out))
    return out


def _unet_calls(pipe, size: int, steps: int) -> float:
    gen = pipe.generate(prompt="a lighthouse", height=size, width=size, num_inference_steps=steps, seed=0,
                        guidance_scale=5.0, output_type="latent")  # fmt: skip
    gen.result()
    return statistics.median(gen.denoiser.call_seconds[1:])


def _ir_lora(folder: Path, path: Path, rank: int, seed: int) -> Path:
    """A PEFT-key LoRA (no metadata: alpha = rank) on the attention and feed-forward layers of the folder's UNet
    IR, made from the IR's shapes (numpy only)."""
    import openvino as ov
    from safetensors.numpy import save_file

    from runtime.lora_layers import targets

    table = targets(ov.Core().read_model(folder / "unet" / "openvino_model.xml"), "unet")
    rng, sd = np.random.default_rng(seed), {}
    for module, (_, kind, shape) in sorted(table.items()):
        if kind == "linear" and module.endswith(ATTN_FF):
            sd[f"unet.{module}.lora_A.weight"] = (rng.standard_normal((rank, shape[1])) * 0.01).astype(np.float16)
            sd[f"unet.{module}.lora_B.weight"] = (rng.standard_normal((shape[0], rank)) * 0.01).astype(np.float16)
    save_file(sd, str(path))
    return path


def _folder_mode(a) -> int:
    """Real-size mode: --folder plain, with a rank-R LoRA at run time, and --fused (the same LoRA fused at
    conversion) and openvino.genai (--genai, on the --fused folder: an i64-timestep one), interleaved rounds, one
    compiled UNet at a time (each configuration compiles, warms up with a 2-step generation, then times one of
    --steps steps, and releases)."""
    import gc

    from benchmarks.machine import matmul_gflops
    from runtime.pipeline import SDXLPipeline

    tmp = Path(tempfile.mkdtemp())
    loras = a.lora or [_ir_lora(a.folder, tmp / f"lora{i}.safetensors", a.rank, seed=i) for i in range(2)]
    figures: dict[str, float] = {}
    mm = matmul_gflops(2048)
    print(f"MatMul 2048^3: {mm['openvino_bf16']:.0f} bf16 / {mm['openvino_f32']:.0f} f32 GFLOP/s (OpenVINO)")
    pipe = SDXLPipeline(a.folder, precision=a.precision, cache_dir=None)
    t = time.perf_counter()
    _unet_calls(pipe, a.size, 2)
    figures["first generation, plain (cold compiles + 2 steps)"] = time.perf_counter() - t
    shapes = {name: shape for name, shape in next(iter(pipe.unet._compiled))}
    pipe.unet.release()
    t = time.perf_counter()
    pipe.unet.compile(shapes)
    figures["unet cold compile (plain)"] = time.perf_counter() - t
    pipe.unet.release()
    lp = SDXLPipeline(a.folder, precision=a.precision, cache_dir=None)
    rss = [_rss()]
    for i, path in enumerate(loras[:2]):
        t = time.perf_counter()
        lp.load_lora_weights(path, adapter_name=f"l{i}")
        figures[f"load_lora_weights #{i + 1}"] = time.perf_counter() - t
        rss.append(_rss())
        figures[f"RSS added by adapter #{i + 1} (GiB)"] = (rss[-1] - rss[-2]) / 2**30
    t = time.perf_counter()
    lp.load_lora_weights(loras[0], adapter_name="again")
    figures["load_lora_weights, the same file again"] = time.perf_counter() - t
    lp.set_adapters("l0")
    t = time.perf_counter()
    lp.unet.compile(shapes)
    figures["unet cold compile (LoRA variant)"] = time.perf_counter() - t
    figures["switch: set_adapters (median of 4)"] = _switch_seconds(lp, ("l1", "l0", "l1", "l0"))
    lp.unet.release()
    configs = {"plain": lambda: _timed(pipe, a), "active": lambda: _timed(lp, a)}
    if a.fused is not None:
        fp = SDXLPipeline(a.fused, precision=a.precision, cache_dir=None)
        configs["fused"] = lambda: _timed(fp, a)
    if a.genai:
        kohya = a.genai_lora or _as_kohya(loras[0], tmp / "lora_kohya.safetensors")
        for label, path in (("plain", None), ("active", kohya)):
            configs[f"openvino.genai {label}"] = lambda path=path: _genai_step(a, a.fused or a.folder, path)
    rounds: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(a.rounds):  # interleaved: the machine's speed drifts
        for label, fn in configs.items():
            rounds[label].append(fn())
            gc.collect()
            rss = _rss() / 2**30
            print(f"round {r + 1} {label:24s} {rounds[label][-1]:8.3f} s/step  RSS {rss:.2f} GiB", flush=True)
    for label, times in rounds.items():
        figures[f"step {label} (median of {a.rounds} rounds)"] = statistics.median(times)
    base = statistics.median(rounds["plain"])
    for label, times in rounds.items():
        if label != "plain":
            figures[f"{label} / plain"] = statistics.median(times) / base
    if "fused" in rounds:
        figures["active / fused"] = statistics.median(rounds["active"]) / statistics.median(rounds["fused"])
        paired = [x / y for x, y in zip(rounds["active"], rounds["fused"], strict=True)]
        figures["active / fused, median of per-round ratios"] = statistics.median(paired)
    if "openvino.genai active" in rounds:
        figures["active / openvino.genai active"] = statistics.median(rounds["active"]) / statistics.median(
            rounds["openvino.genai active"]
        )
    figures["switch / cold compile"] = (
        figures["switch: set_adapters (median of 4)"] / figures["unet cold compile (plain)"]
    )
    for k, v in figures.items():
        print(f"{k:80s} {v:8.3f}")
    return 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(pipe, a) -> float:
    """A 2-step warm-up (compiles), then the median UNet call of a --steps generation; the UNet released."""
    try:
        _unet_calls(pipe, a.size, 2)
        return _unet_calls(pipe, a.size, a.steps)
    finally:
        pipe.unet.release()


def _genai_step(a, folder: Path, lora: Path | None) -> float:
    """openvino.genai's Text2ImagePipeline, static shapes (reshape + compile), with the adapter or none: the mean
    of its UNet calls after the first in a --steps generation (its own timers), after a warm-up generation."""
    import openvino_genai as genai

    extra = {"adapters": genai.AdapterConfig(genai.Adapter(str(lora)), 1.0)} if lora else {}
    gp = genai.Text2ImagePipeline(str(folder))
    gp.reshape(1, a.size, a.size, 5.0)
    gp.compile("CPU", INFERENCE_PRECISION_HINT=a.precision, **extra)
    kw = dict(height=a.size, width=a.size, guidance_scale=5.0, **extra)
    gp.generate("a lighthouse", num_inference_steps=2, **kw)
    gp.generate("a lighthouse", num_inference_steps=a.steps, **kw)
    seconds = gp.get_performance_metrics().get_first_and_other_unet_infer_duration()[1] / 1000
    del gp
    return seconds


def _switch_seconds(pipe, names) -> float:
    """The median seconds of set_adapters(name) over `names`, switched in turn."""
    return statistics.median(seconds(lambda n=n: pipe.set_adapters(n)) for n in names)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_runtime")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--folder", type=Path, default=None,
                   help="a converted folder (e.g. a real-size random-weight one): plain vs a rank-R LoRA made "
                   "from its IR's shapes, interleaved with --fused and --genai")  # fmt: skip
    p.add_argument(
        "--fused",
        type=Path,
        default=None,
        help="with --folder: the folder converted with --lora of the first LoRA (timed beside it)",
    )
    p.add_argument(
        "--lora",
        type=Path,
        action="append",
        default=None,
        help="with --folder: the LoRA files (PEFT keys; default: two made from the IR's shapes)",
    )
    p.add_argument("--genai-lora", type=Path, default=None, help="the first LoRA in kohya keys, for openvino.genai")
    p.add_argument("--compare", default=None, metavar="A,B[,C...]",
                   help="with --folder: two or more of plain, active, disabled, fused, fuse_lora, genai-plain, "
                   "genai-active, all kept compiled, alternated for --rounds rounds")  # fmt: skip
    p.add_argument("--unet-calls", action="store_true",
                   help="with --compare: alternate single UNet calls (same inputs) instead of generations: "
                   "neighbours seconds apart, for this machine's changes of speed")  # fmt: skip
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="K",
        help="with --compare: K rounds of one process per configuration (alternated, each compiles its "
        "own and times --rounds single UNet calls): the figure two compiled copies' placement cannot bias",
    )
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a --processes child
    p.add_argument("--genai", action="store_true", help="also openvino.genai's run-time adapter (an i64 folder)")
    a = p.parse_args(argv)
    a.argv = list(argv) if argv is not None else sys.argv[1:]

    if a.folder is not None and a.compare:
        from benchmarks.lora_compare import pair_mode

        return pair_mode(a)
    if a.folder is not None:
        return _folder_mode(a)
    from convert.pipeline import convert_pipeline
    from runtime.pipeline import SDXLPipeline
    from tests.models import ov_dir, source_dir

    src, folder = source_dir("mid"), ov_dir("mid")
    tmp = Path(tempfile.mkdtemp())
    lora = _make_lora(src, tmp / "lora.safetensors", a.rank, seed=1)
    kohya = _as_kohya(lora, tmp / "lora_kohya.safetensors")  # the same LoRA in kohya keys (openvino.genai's)
    other = _make_lora(src, tmp / "other.safetensors", a.rank, seed=2)
    fused_dir = tmp / "fused"
    convert_pipeline(str(src), fused_dir, weight_format="fp32", loras=[(lora, 1.0)], log=lambda s: None,
                     isolate=False)  # fmt: skip

    def pipeline(path):
        return SDXLPipeline(path, precision=a.precision, cache_dir=None)

    figures: dict[str, float] = {}
    pipe = pipeline(folder)
    _unet_calls(pipe, a.size, 2)
    shapes = {name: shape for name, shape in next(iter(pipe.unet._compiled))}
    t = time.perf_counter()
    pipeline(folder).unet.compile(shapes)
    figures["unet cold compile (plain)"] = time.perf_counter() - t
    lp = pipeline(folder)
    rss0 = _rss()
    t = time.perf_counter()
    lp.load_lora_weights(lora, adapter_name="a")
    figures["load_lora_weights (first)"] = time.perf_counter() - t
    figures["RSS added by the load (GiB)"] = (_rss() - rss0) / 2**30
    lp.load_lora_weights(other, adapter_name="b")
    t = time.perf_counter()
    lp.load_lora_weights(lora, adapter_name="a2")
    figures["load_lora_weights (same file again)"] = time.perf_counter() - t
    lp.set_adapters("a")
    t = time.perf_counter()
    _unet_calls(lp, a.size, 2)
    figures["first generation with adapters (LoRA variant compile + text encoders + 2 steps)"] = time.perf_counter() - t
    figures["RSS added by 3 loads + LoRA variant (GiB)"] = (_rss() - rss0) / 2**30
    figures["switch: set_adapters (median of 4)"] = _switch_seconds(lp, ("b", "a", "b", "a"))
    fused = pipeline(fused_dir)
    _unet_calls(fused, a.size, 2)

    def disabled(p):
        lp.disable_lora()
        try:
            return _unet_calls(lp, a.size, a.steps)
        finally:
            lp.enable_lora()

    configs = {"plain": lambda: _unet_calls(pipe, a.size, a.steps), "active": lambda: _unet_calls(lp, a.size, a.steps),
               "fused": lambda: _unet_calls(fused, a.size, a.steps), "disabled": lambda: disabled(lp)}  # fmt: skip
    if a.genai:
        import openvino_genai as genai

        gdir = str(ov_dir("mid", timestep_dtype="i64"))
        kw = dict(height=a.size, width=a.size, num_inference_steps=a.steps, guidance_scale=5.0)
        for label, path in (("plain", None), ("active", kohya)):
            config = genai.AdapterConfig(genai.Adapter(str(path)), 1.0) if path else None
            extra = {"adapters": config} if config is not None else {}
            gp = genai.Text2ImagePipeline(gdir, "CPU", INFERENCE_PRECISION_HINT=a.precision, **extra)

            def run(gp=gp, extra=extra):
                gp.generate("a lighthouse", **kw, **extra)
                return gp.get_performance_metrics().get_first_and_other_unet_infer_duration()[1] / 1000  # ms

            run()
            configs[f"openvino.genai {label}"] = run
    rounds: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(a.rounds):  # interleaved, min over rounds: the machine may be shared
        for label, fn in configs.items():
            rounds[label].append(fn())
    for label, times in rounds.items():
        figures[f"step {label} (min of {a.rounds} rounds of {a.steps}-step medians)"] = min(times)
    figures["active / fused"] = min(rounds["active"]) / min(rounds["fused"])
    figures["disabled / plain"] = min(rounds["disabled"]) / min(rounds["plain"])
    for k, v in figures.items():
        print(f"{k:80s} {v:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
