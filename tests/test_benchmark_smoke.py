"""Smoke test of the benchmark harness on the tiny base model (one run, two steps, 128 x 128)."""

from __future__ import annotations

import importlib.util
import json
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

    summary = next(r for r in records if r["kind"] == "summary")
    for key in ("openvino", "device", "precision", "cpu_flags", "model", "height", "width", "steps", "model_bytes"):
        assert key in summary, key
    assert summary["steps"] == 2 and summary["height"] == summary["width"] == 128
    assert 0 < summary["bound"] <= summary["medians"]["end_to_end"] * 1.5
    assert summary["overhead_ratio"] > 0 and summary["images_per_s"] > 0
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

    bad = subprocess.run([*cmd[:4], str(tmp_path), *cmd[5:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and len(bad.stderr.splitlines()) == 1
