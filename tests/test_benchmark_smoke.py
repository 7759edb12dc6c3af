"""Smoke test of the benchmark harness on the tiny base model (one run, two steps, 128 x 128)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys

from PIL import Image

from tests.models import ROOT, ov_dir

STAGES = ["load", "compile_cold", "compile_cache_fill", "compile_warm", "tokenize", "text_encoder", "text_encoder_2",
          "unet_step_first", "unet_step_steady", "unet_loop", "vae_decode", "end_to_end", "bound_text_encoders",
          "bound_unet", "bound_vae_decode", "bound"]  # fmt: skip


def _run(*args):
    cmd = [sys.executable, "-m", "benchmarks.run", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "tmp"
    # the i64 timestep: genai's Text2ImagePipeline loads the folder, so it runs side by side where installed
    model = ov_dir("base", timestep_dtype="i64")
    proc = _run("--model", model, "--steps", 2, "--height", 128, "--width", 128, "--runs", 1, "--warmup", 0,
                "--precision", "f32", "--out", out, "--matmul", 256)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    seconds = {r["stage"]: r["seconds"] for r in records if r["kind"] == "measurement" and r["arm"] == "ours"
               and "seconds" in r}  # fmt: skip
    for stage in STAGES:
        assert seconds.get(stage, 0) > 0, (stage, seconds)
    machine = next(r for r in records if r["kind"] == "machine")  # the day's speed beside the absolute times
    assert machine["matmul_size"] == 256 and machine["matmul_gflops"]["openvino_bf16"] > 0
    rss = [r["bytes"] for r in records if r["kind"] == "measurement" and r["stage"] == "peak_rss"]
    assert rss and rss[0] > 0
    # the runtime's own timers: each UNet call (the generation's denoiser), each text encoder and VAE call (OVModel)
    detail = next(r for r in records if r["kind"] == "detail" and r["arm"] == "ours")
    assert len(detail["unet_calls"]) == 2 and min(detail["unet_calls"]) > 0
    models = {"text_encoder", "text_encoder_2", "vae_decoder"}
    calls = detail["model_calls"]
    assert set(calls) == models and all(len(v) == 1 and v[0] > 0 for v in calls.values()), calls
    assert set(detail["compile_cold_per_model"]) == models | {"unet"}
    # the UNet's FLOPs per call at the call's shapes (batch 2, 16 x 16 latent), its achieved GFLOP/s per run
    from benchmarks.flops import call_shapes, unet_flops

    xml = model / "unet" / "openvino_model.xml"
    gflop = unet_flops(xml, call_shapes(xml, 128, 128, 2))["gflop"]
    assert detail["unet_gflop_per_call"] == gflop > 0 and "2 x multiply-accumulates" in detail["unet_flops_method"]
    assert detail["unet_achieved_gflops"] == gflop / statistics.median(detail["unet_calls"])

    summary = next(r for r in records if r["kind"] == "summary")
    for key in ("openvino", "device", "precision", "cpu_flags", "model", "height", "width", "steps", "model_bytes"):
        assert key in summary, key
    assert summary["steps"] == 2 and summary["height"] == summary["width"] == 128
    # the bound is its parts' sum (times measured beside a busy machine are not compared: no wall-clock limits)
    parts = sum(seconds[k] for k in ("bound_text_encoders", "bound_unet", "bound_vae_decode"))
    assert summary["bound"] == seconds["bound"] and abs(seconds["bound"] - parts) <= 1e-9 * parts
    assert summary["overhead_ratio"] == summary["medians"]["end_to_end"] / summary["bound"]
    assert summary["images_per_s"] > 0
    assert summary["unet_gflop_per_call"] == gflop and summary["unet_achieved_gflops"] == detail["unet_achieved_gflops"]
    assert "overhead ratio" in proc.stdout
    targets = {t["target"]: t for t in summary["targets"]}
    assert targets["overhead ratio (end to end / bound)"]["value"] == summary["overhead_ratio"]
    warm = targets["warm start / cold start (load + compile)"]
    m = summary["medians"]
    assert warm["value"] == (m["load"] + m["compile_warm"]) / (m["load"] + m["compile_cold"])
    for arm in ("optimum", "optimum-static"):
        assert targets[f"end to end / {arm}"]["value"] is None and targets[f"end to end / {arm}"]["met"] is None

    table = (out / "table.md").read_text()
    assert "| stage | median s | share of end-to-end |" in table and "| end_to_end |" in table
    assert "| target | measured | paired | limit | met |" in table
    assert f"UNet {gflop:.1f} GFLOP per call, achieved {summary['unet_achieved_gflops']:.1f} GFLOP/s" in table
    with Image.open(out / "stages.png") as im:
        im.load()
        assert im.width > 0 and im.height > 0

    anchors = {r["arm"]: r["status"] for r in records if r["kind"] == "anchor"}
    if importlib.util.find_spec("openvino_genai") is None:
        assert anchors["genai"].startswith("skipped:") and anchors["genai-static"].startswith("skipped:")
    assert anchors["diffusers"] == "skipped: no --diffusers-source DIR given"
    assert anchors["optimum"] == anchors["optimum-static"] == "skipped: no --optimum-python PATH given"
    # an anchor that ran reports the time in its own model calls (genai: its performance metrics), within its
    # end to end, and the table gives its overhead ratio
    ran = {r["arm"] for r in records if r["kind"] == "measurement"} - {"ours"}
    if importlib.util.find_spec("openvino_genai") is not None:
        assert {"genai", "genai-static"} <= ran, anchors
    for arm in ran:
        got = {r["stage"]: r.get("seconds") for r in records if r["kind"] == "measurement" and r["arm"] == arm}
        if arm.startswith("genai"):
            assert 0 < got["model_calls"] < got["end_to_end"], (arm, got)
            row = next(line for line in table.splitlines() if line.startswith(f"| {arm} |"))
            overhead = float(row.split("|")[8])
            assert abs(overhead - got["end_to_end"] / got["model_calls"]) < 1e-3
    assert "skipped:" in table


def test_harness_takes_deepcache_and_the_guidance_cutoff(tmp_path):
    """Ours with DeepCache N=3 and a cut-off at 0.5 of 6 steps: 6 UNet calls, 2 of them full at the guided batch
    (steps 0 and 3; diffusers' recipe cuts after step int(6 x 0.5) = 3), the bound their own inference times."""
    out = tmp_path / "out"
    proc = _run("--model", ov_dir("base"), "--steps", 6, "--height", 64, "--width", 64, "--runs", 1, "--warmup", 0,
                "--matmul", 128, "--against", "none", "--out", out, "--deepcache-interval", 3,
                "--guidance-cutoff", 0.5)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ours: deepcache_interval=3 guidance_cutoff=0.5 (the anchors: plain)" in proc.stdout
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    detail = next(r for r in records if r["kind"] == "detail" and r["arm"] == "ours")
    assert detail["strategy"] == {"deepcache_interval": 3, "guidance_cutoff": 0.5}
    calls, full = detail["unet_calls"], detail["unet_full_calls"]
    assert len(calls) == 6 and full == [calls[0], calls[3]]
    assert detail["unet_achieved_gflops"] == detail["unet_gflop_per_call"] / statistics.median(full)
    bound = next(r for r in records if r["kind"] == "measurement" and r.get("stage") == "bound_unet")
    assert bound["seconds"] == sum(calls)
    summary = next(r for r in records if r["kind"] == "summary")
    assert summary["strategy"] == detail["strategy"]
    assert (out / "table.md").read_text().startswith("Ours with deepcache_interval=3 guidance_cutoff=0.5")
    proc = _run("--model", ov_dir("base"), "--guidance-cutoff", 1.5, "--out", out / "bad")
    assert proc.returncode == 2 and proc.stderr.startswith("error: guidance_cutoff") and not (out / "bad").exists()


def test_benchmark_bad_input(tmp_path):
    for args in (["--model", tmp_path, "--steps", 2], ["--model", ov_dir("base"), "--steps", 0]):
        proc = _run(*args, "--out", tmp_path / "out")
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert not (tmp_path / "out").exists()
    # run as a file from another folder: it imports its own checkout, paths are the caller's
    cmd = [sys.executable, ROOT / "benchmarks" / "run.py", "--model", "missing", "--out", "out"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: missing: not a converted SDXL model folder (no model_index.json)\n"


def test_choices_measures_each_variant_against_the_runtimes_choice(tmp_path):
    """benchmarks.choices on the tiny model: every variant runs in its own child and gets a row with its ratio to
    the runtime's choice; bf16's accuracy against f32 is reported per model; the record is appended."""
    results = tmp_path / "choices.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.choices", "--model", str(ov_dir("base")), "--size", "64",
           "--rounds", "1", "--calls", "1", "--results", str(results), "--matmul", "256"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from benchmarks.choices import VARIANTS

    (rec,) = [json.loads(line) for line in results.read_text().splitlines()]
    rows = {(r["component"], r["variant"]): r for r in rec["rows"]}
    assert set(rows) == {(v[0], v[1]) for v in VARIANTS}
    for r in rows.values():
        assert r["s_per_call"] > 0 and r["peak_rss"] > 0
        if r["ours"]:
            assert r["vs_ours"] == 1.0
        else:
            ours = next(o for o in rows.values() if o["ours"] and o["component"] == r["component"])
            assert r["vs_ours"] == r["s_per_call"] / ours["s_per_call"]
    assert rec["accuracy"]["vae_decoder"]["psnr_db"] > 20
    assert rec["matmul_size"] == 256 and rec["matmul_gflops"]["openvino_bf16"] > 0  # the day's speed, recorded
    for c in ("unet", "text_encoder_2"):
        assert 0 < rec["accuracy"][c]["rel_max_err"] < 0.1
    assert "| unet | two batch-1 calls per step |" in proc.stdout
    # each UNet row: FLOPs per batch-2 call and achieved GFLOP/s = FLOPs / its median seconds; the record: ours
    from benchmarks.flops import call_shapes, unet_flops

    xml = ov_dir("base") / "unet" / "openvino_model.xml"
    gflop = unet_flops(xml, call_shapes(xml, 64, 64, 2))["gflop"]
    for r in rows.values():
        if r["component"] == "unet":
            assert r["unet_gflop_per_call"] == gflop > 0 and r["unet_achieved_gflops"] == gflop / r["s_per_call"]
        else:
            assert "unet_achieved_gflops" not in r
    ours = next(r for r in rows.values() if r["ours"] and r["component"] == "unet")
    assert rec["unet_achieved_gflops"] == ours["unet_achieved_gflops"] and rec["unet_gflop_per_call"] == gflop
    assert f"unet (ours): UNet {gflop:.1f} GFLOP per call" in proc.stdout

    bad = subprocess.run([*cmd[:4], str(tmp_path), *cmd[5:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and len(bad.stderr.splitlines()) == 1


def test_real_size_records_the_unets_achieved_gflops(monkeypatch):
    """benchmarks.real_size's child and record on the tiny model: the UNet's FLOPs per call at its first call's
    shapes and the achieved GFLOP/s = FLOPs / the median seconds of the full calls at those shapes (DeepCache's
    shallow calls and the guidance cut-off's batch-1 calls left out)."""
    from benchmarks import real_size
    from benchmarks.flops import call_shapes, unet_flops

    monkeypatch.setattr(real_size, "_folder", lambda name, weights: ov_dir("base"))
    xml = ov_dir("base") / "unet" / "openvino_model.xml"
    spec = dict(model="tiny", weights="fp32", size=64, steps=2, low_memory=False, refiner=None, high_noise_frac=0.8)
    cache: dict = {}
    plain = {**spec, **real_size.child(spec)}
    plain |= real_size.unet_figures(plain, "tiny", None, "fp32", cache)
    assert plain["unet_call_shape"] == [0, 0] and plain["unet_achieved_calls"] == 2
    assert plain["unet_gflop_per_call"] == unet_flops(xml, call_shapes(xml, 64, 64, 2))["gflop"] > 0
    assert plain["unet_achieved_gflops"] == plain["unet_gflop_per_call"] / statistics.median(plain["unet_calls_s"])
    assert "2 x multiply-accumulates" in plain["unet_flops_method"]
    # 4 steps, DeepCache N=3 (full steps 0 and 3), guidance cut off after step int(4 x 0.5) = 2 (step 3: batch 1)
    mixed = {**spec, "steps": 4, "deepcache_interval": 3, "guidance_cutoff": 0.5}
    mixed |= real_size.child(mixed)
    mixed |= real_size.unet_figures(mixed, "tiny", None, "fp32", cache)
    assert mixed["unet_call_shape"] == [0, None, None, 1] and mixed["shallow_calls"] == 2
    assert [s["sample"][0] for s in mixed["unet_shapes"]] == [2, 1]
    assert mixed["unet_achieved_calls"] == 1 and len(cache) == 1  # the same shapes: counted once
    assert mixed["unet_achieved_gflops"] == plain["unet_gflop_per_call"] / mixed["unet_calls_s"][0]


def test_quant_real_records_the_unets_achieved_gflops(monkeypatch, tmp_path):
    """benchmarks.quant_real's timing on the tiny model: each record has the UNet's FLOPs per batch-2 call and the
    achieved GFLOP/s = FLOPs / the median call's seconds; the table shows both."""
    from benchmarks import quant_real
    from benchmarks.flops import call_shapes, unet_flops

    (tmp_path / "tiny-random-ov-fp16").symlink_to(ov_dir("base"))
    monkeypatch.setattr(quant_real, "OUT", tmp_path)
    (rec,) = quant_real.time_all(["tiny"], 64, rounds=1, calls=2, variants=[("fp16 IR, f32", None, "f32")])
    xml = ov_dir("base") / "unet" / "openvino_model.xml"
    assert rec["unet_gflop_per_call"] == unet_flops(xml, call_shapes(xml, 64, 64, 2))["gflop"] > 0
    assert rec["unet_achieved_gflops"] == rec["unet_gflop_per_call"] / rec["median_call_s"]
    row = quant_real.table([rec]).splitlines()[-1]
    assert row.endswith(f"| {rec['unet_gflop_per_call']:.0f} | {rec['unet_achieved_gflops']:.0f} |"), row


def test_compile_memory_smoke():
    """benchmarks.compile_memory on the tiny UNet: each configuration compiled in a child, the table printed;
    a folder without a UNet is one line, exit 2."""
    cmd = [sys.executable, "-m", "benchmarks.compile_memory", str(ov_dir("base")), "--intervals", "0.1", "0",
           "--size", "64", "--rounds", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| 0.1 | 2 |", "| none | 2 |"))]
    assert len(rows) == 2 and all(float(row.split("|")[4].split("-")[0]) > 0 for row in rows), proc.stdout
    proc = subprocess.run([*cmd[:3], str(ROOT / "nope")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no unet/openvino_model.xml there" in proc.stderr
