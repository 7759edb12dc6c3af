"""python -m benchmarks.lora_runtime --folder DIR [--fused DIR] --lora F --compare A,B[,C...]: configurations kept
compiled and alternated (generations, or single UNet calls with --unet-calls), an A/A control (NAME#2), or each
configuration in processes of its own (--processes K). Never a timed test."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks.lora_runtime import _peak_rss, _rss, _unet_calls


def pair_mode(a) -> int:
    """--compare A,B[,C...] (of plain, active, disabled, fused, fuse_lora, genai-plain, genai-active; fuse_lora: the
    LoRA fused at run time; disabled: active's pipeline after disable_lora()): all kept compiled, then --rounds rounds
    of one generation of --steps steps each, in an order reversed every round (A, B, B, A, ...: call-level
    neighbours, so that the machine's speed changes fall on all); per generation the median UNet call after the
    first; each one's ratio to the last as the median of the per-round ratios and as the ratio of medians.
    --unet-calls: one UNet call each (fixed random inputs) instead of a generation, so that neighbours are seconds
    apart. NAME#2 builds NAME again: an A/A control, whose ratio says how far two compiled copies of one graph differ
    on the day."""
    from benchmarks.machine import matmul_gflops
    from runtime.pipeline import SDXLPipeline

    def ours(folder, lora=None, fuse=False):
        pipe = SDXLPipeline(folder, precision=a.precision, cache_dir=None)
        if lora is not None:
            pipe.load_lora_weights(lora, adapter_name="a")
        if fuse:
            pipe.fuse_lora()
        t = time.perf_counter()
        _unet_calls(pipe, a.size, 2)  # compiles
        print(f"  first generation (2 steps, compiles): {time.perf_counter() - t:.1f} s", flush=True)
        if a.unet_calls:
            inputs = _unet_inputs(pipe.unet, a.size)
            call = lambda: _one_call(pipe.unet, inputs)  # noqa: E731
        else:
            call = lambda: _unet_calls(pipe, a.size, a.steps)  # noqa: E731
        if lora is None or fuse:
            return call
        built.setdefault("lora", (pipe, call))

        def toggled():  # the adapter on: another configuration may share this pipeline with it off
            pipe.enable_lora()
            return call()

        return toggled

    def disabled():
        """The adapter loaded, then disable_lora(): on the pipeline of "active" if one is built (the same compiled
        model, toggled between calls: no difference of placement between two compiled copies), else its own."""
        if "lora" not in built:
            ours(a.folder, lora)
        pipe, call = built["lora"]

        def off():
            pipe.disable_lora()
            return call()

        return off

    def genai(lora=None):
        import openvino_genai as og

        extra = {"adapters": og.AdapterConfig(og.Adapter(str(lora)), 1.0)} if lora else {}
        gp = og.Text2ImagePipeline(str(a.fused or a.folder))
        gp.reshape(1, a.size, a.size, 5.0)
        gp.compile("CPU", INFERENCE_PRECISION_HINT=a.precision, **extra)
        kw = dict(height=a.size, width=a.size, guidance_scale=5.0, **extra)

        def step():
            gp.generate("a lighthouse", num_inference_steps=a.steps, **kw)
            return gp.get_performance_metrics().get_first_and_other_unet_infer_duration()[1] / 1000  # ms -> s

        step()
        return step

    if (a.unet_calls or a.processes) and any(n.startswith("genai") for n in a.compare.split(",")):
        flag = "--unet-calls" if a.unet_calls else "--processes"
        raise SystemExit(f"{flag}: our pipelines only (openvino.genai's calls are timed by generations)")
    lora = (a.lora or [None])[0]
    built: dict[str, tuple] = {}
    make = {"plain": lambda: ours(a.folder), "active": lambda: ours(a.folder, lora), "disabled": disabled,
            "fused": lambda: ours(a.fused), "fuse_lora": lambda: ours(a.folder, lora, fuse=True),
            "genai-plain": lambda: genai(),
            "genai-active": lambda: genai(a.genai_lora)}  # fmt: skip
    names = a.compare.split(",")
    kinds = [n.split("#")[0] for n in names]  # NAME#2: the same configuration built again (an A/A control)
    if len(names) < 2 - bool(a.one) or len(set(names)) != len(names) or not set(kinds) <= set(make):
        raise SystemExit(f"--compare A,B[,C...]: two or more of {', '.join(make)} (NAME#2: the same again)")
    if a.one:  # a child of --processes: one configuration, --rounds UNet calls
        call = make[kinds[0]]()
        print("CALLS " + json.dumps([call() for _ in range(a.rounds)]), flush=True)
        return 0
    mm = matmul_gflops(2048)
    print(f"MatMul 2048^3: {mm['openvino_bf16']:.0f} bf16 / {mm['openvino_f32']:.0f} f32 GFLOP/s (OpenVINO)")
    times: dict[str, list[float]] = {n: [] for n in names}
    if a.processes:
        for r in range(a.processes):
            for n in names if r % 2 == 0 else reversed(names):
                times[n].append(statistics.median(_child_calls(a, n)))
            print(f"process round {r + 1}: " + "  ".join(f"{n} {times[n][-1]:.3f} s" for n in names), flush=True)
    else:
        run = {n: make[k]() for n, k in zip(names, kinds, strict=True)}
        print(f"all compiled, RSS {_rss() / 2**30:.2f} GiB", flush=True)
        for r in range(a.rounds):
            for n in names if r % 2 == 0 else reversed(names):
                times[n].append(run[n]())
            print(f"round {r + 1}: " + "  ".join(f"{n} {times[n][-1]:.3f} s" for n in names), flush=True)
    y = names[-1]
    print("median UNet call: " + ", ".join(f"{n} {statistics.median(times[n]):.3f} s" for n in names))
    for x in names[:-1]:
        ratios = [p / q for p, q in zip(times[x], times[y], strict=True)]
        print(f"{x} / {y}: ratio of medians {statistics.median(times[x]) / statistics.median(times[y]):.3f}, "
              f"median of per-round ratios {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
              f"max {max(ratios):.3f})")  # fmt: skip
    print(f"peak RSS {_peak_rss() / 2**30:.2f} GiB")
    return 0


def _child_calls(a, name: str) -> list[float]:
    """--processes: one configuration in a process of its own (its own compile, so its own placement of the weights
    in memory: two compiled copies of one graph in one process differed by up to 9 % a call, one or the other);
    its UNet calls' seconds."""
    argv = [str(x) for x in a.argv]
    for flag in ("--compare", "--processes", "--rounds"):
        while flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    argv += ["--compare", name.split("#")[0], "--one", "--unet-calls", "--rounds", str(a.rounds)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lora_runtime", *argv], capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CALLS ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{name}: the child process failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1].removeprefix("CALLS "))


def _unet_inputs(unet, size: int) -> dict[str, np.ndarray]:
    """Inputs of one guided UNet call at size x size (batch 2: the guidance's pair; 77 tokens), random but fixed;
    the sizes the model fixes are its own."""
    rng, out = np.random.default_rng(0), {}
    for name in unet.input_names:
        fill = {"sample": [2, 4, size // 8, size // 8], "encoder_hidden_states": [2, 77]}.get(name, [2])
        dims = [d.get_length() if d.is_static else fill[i] for i, d in enumerate(unet.input_shapes[name])]
        out[name] = rng.standard_normal(dims).astype(unet.input_types[name])
    out["timestep"] = np.full(out["timestep"].shape, 500, unet.input_types["timestep"])
    return out


def _one_call(unet, inputs: dict[str, np.ndarray]) -> float:
    """One UNet call (the adapters in force bound as in a generation); its inference seconds."""
    unet(inputs)
    return unet.call_seconds[-1]
