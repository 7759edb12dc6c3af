"""runtime.batch: one image per JSON line, exactly once, locally and on a Ray cluster bound to 127.0.0.1.

The local run is the reference: its PNGs equal runtime.generate's for the same settings byte for byte; a run
killed with SIGKILL and run again, locally or on Ray Data (2 actors of 1 CPU on a 2-CPU `ray start --head`),
ends with the same files and a manifest that names each once. f32, so that the thread count (2 locally, 1 per
Ray actor) does not change a pixel (runtime.batch's epilog).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.ray_cluster import _session
from tests.cli import assert_one_line_error, run
from tests.models import ROOT

LINES = [
    {"prompt": "a red cube"},
    {"prompt": "a lighthouse at dusk", "seed": 1234},
    "a plain string is a prompt",
    {"prompt": "a tall house", "size": "64x96", "steps": 3, "negative_prompt": "blurry"},
    {"prompt": "a cat", "guidance_scale": 7.5, "scheduler": "euler_a"},
    {"prompt": "a dog", "num_inference_steps": 3, "scheduler": "dpmpp_2m"},
    {"prompt": "a tree", "height": 96, "width": 64, "seed": 7},
    {"prompt": "a boat", "negative_prompt": "water", "guidance_scale": 1.0},
    {"prompt": "a bird", "clip_skip": 1},
    {"prompt": "a car", "guidance-scale": 3.0, "seed": 99},
    {"prompt": "a mountain", "guidance_rescale": 0.5},
    {"prompt": "a river"},
]
FLAGS = ["--steps", "2", "--height", "64", "--width", "64", "--precision", "f32", "--seed", "11"]
EXTRA_FILES = {"manifest.jsonl", ".batch.lock"}


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    _, model = tiny("base")
    folder = tmp_path_factory.mktemp("batch")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in LINES[:6]) + "\n\n" +  # a blank line is skipped
                       "\n".join(json.dumps(line) for line in LINES[6:]) + "\n")  # fmt: skip
    return model, prompts, folder / "ov-cache"


def batch_cmd(setup, out: Path, *extra) -> list[str]:
    model, prompts, cache = setup
    args = ["--model", model, "--prompts", prompts, "--out", out, *FLAGS, "--cache-dir", cache, *extra]
    return [sys.executable, "-m", "runtime.batch", *(str(a) for a in args)]


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    proc = subprocess.run(batch_cmd(setup, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out


def assert_complete(out: Path, reference: Path) -> None:
    """Every line once in the manifest, its file there, nothing else left; the files equal the reference's."""
    entries = manifest(out)
    names = [e["file"] for e in entries]
    assert len(names) == len(set(names)) == 12, names
    assert sorted(e["line"] for e in entries) == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]  # line 7 is blank
    assert {p.name for p in out.iterdir()} == set(names) | EXTRA_FILES  # no partial file, no other image
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_local_run_matches_the_cli(setup, local_run, tmp_path):
    entries = {e["line"]: e for e in manifest(local_run)}
    assert_complete(local_run, local_run)
    assert entries[1]["seed"] == 11 and entries[2]["seed"] == 1234 and entries[3]["seed"] == 13  # --seed + index
    tall = entries[4]["settings"]
    assert [tall[k] for k in ("width", "height", "num_inference_steps", "negative_prompt")] == [64, 96, 3, "blurry"]
    assert entries[5]["settings"]["sampler"] == "Euler a" and entries[11]["settings"]["guidance_scale"] == 3.0
    model, _, cache = setup
    for line, flags in [
        (1, ["--prompt", "a red cube", "--seed", "11", "--height", "64", "--width", "64", "--steps", "2"]),
        (4, ["--prompt", "a tall house", "--seed", "14", "--height", "96", "--width", "64", "--steps", "3",
             "--negative-prompt", "blurry"]),
    ]:  # fmt: skip
        png = tmp_path / f"cli-{line}.png"
        proc = run("runtime.generate", "--model", model, *flags, "--precision", "f32", "--cache-dir", cache,
                   "--output", png, "--quiet")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert png.read_bytes() == (local_run / entries[line]["file"]).read_bytes(), line


@pytest.mark.parametrize(
    "lines, needle",
    [
        (['{"prompt": "a"}', '{"prompt": "b", "steps": 0}'], ":2: num_inference_steps=0"),
        (['{"prompt": "a"', '{"prompt": "b"}'], ":1: not JSON"),
        (['{"prompt": "a"}', "", '{"prompt": "b", "colour": 3}'], ":3: unknown key 'colour'"),
        (['{"prompt": "a", "size": "large"}'], ":1: size='large'"),
        (['{"prompt": "a", "scheduler": "nope"}'], ":1:"),
        (["[1, 2]"], ':1: expected a JSON object with a "prompt"'),
        (['{"prompt": "a", "seed": -1}'], ":1: seed=-1"),
        (['{"prompt": "a", "image": "missing.png"}'], ":1: image"),
        (['{"prompt": "a", "high_noise_frac": 0.8}'], ":1: high_noise_frac and refiner_strength need --refiner"),
    ],
)
def test_bad_lines_fail_before_any_work(setup, tmp_path, capsys, lines, needle):
    from runtime.batch import main

    prompts = tmp_path / "bad.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    model, _, cache = setup
    out = tmp_path / "out"
    code = main(["--model", str(model), "--prompts", str(prompts), "--out", str(out), *FLAGS, "--cache-dir", cache])
    err = capsys.readouterr().err
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err), needle)
    assert f"bad.jsonl{needle}" in err, err
    assert not out.exists()  # checked before the output folder was made


def test_bad_flags(setup, tmp_path, capsys):
    from runtime.batch import main

    model, prompts, cache = setup
    for extra, needle in [(["--num-images", "2"], "--num-images"), (["--preview", "approx"], "--preview")]:
        code = main(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o"), *FLAGS, *extra])
        assert_one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), needle)


def kill_after(cmd: list[str], out: Path, lines: int, env=None, timeout: float = 300) -> int:
    """Start the batch, SIGKILL it once its manifest has `lines` lines -> its pid (now dead)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            path = out / "manifest.jsonl"
            if path.exists() and path.read_bytes().count(b"\n") >= lines:
                break
            assert proc.poll() is None, f"the batch ended before it was killed: {proc.stderr.read()}"
            time.sleep(0.01)
        else:
            raise AssertionError("the manifest did not grow")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9
    return proc.pid


def resume(cmd: list[str], out: Path, pid: int, reference: Path, env=None) -> str:
    """What a kill can leave, made certain (a torn manifest line, a half-written image of the dead process),
    then the same command again: complete and unique."""
    done = {e["file"] for e in manifest(out)}
    assert 3 <= len(done) < 12, done
    missing = sorted({e["file"] for e in manifest(reference)} - done)[0]
    (out / f".{missing}.partial-{pid}").write_bytes(b"\x89PNG\r\n half an image")
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b'{"line": 99, "prompt": "a line cut by the ki')
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "repaired a torn last line" in proc.stderr and f"left by process {pid}" in proc.stderr, proc.stderr
    assert f"{len(done)} done before, {12 - len(done)} to make" in proc.stderr, proc.stderr
    assert_complete(out, reference)
    return proc.stderr


def test_local_kill_and_resume(setup, local_run, tmp_path):
    out = tmp_path / "out"
    cmd = batch_cmd(setup, out)
    resume(cmd, out, kill_after(cmd, out, 3), local_run)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # all done: nothing to make
    assert again.returncode == 0 and "12 done before, 0 to make" in again.stderr, again.stderr
    assert_complete(out, local_run)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1 with 2 CPUs, stopped (its whole process group) at the end."""
    from runtime.ray_cluster import HeadNode

    head = HeadNode(num_cpus=2, timeout=180)
    yield head
    head.stop(timeout=2)
    assert not _session(head.proc.pid), "Ray processes left behind"


def test_ray_kill_resume_equals_local(setup, local_run, ray_head, tmp_path):
    """Ray Data on 2 actors of 1 CPU: killed after 3 images, run again: the local run's files, each once."""
    out = tmp_path / "ray"
    cmd = batch_cmd(setup, out, "--ray", ray_head.address, "--ray-actors", "2", "--ray-cpus-per-actor", "1")
    env = {**os.environ, **ray_head.env}  # the cluster's own auth token
    pid = kill_after(cmd, out, 3, env)
    stderr = resume(cmd, out, pid, local_run, env)
    assert "ray: 2 actor(s) of 1 CPU(s) on [2.0] CPUs" in stderr, stderr
    workers = {e["worker"] for e in manifest(out)}
    assert not any(w.endswith(f":{pid}") for w in workers)  # made by the actors, not by the driver


def test_ray_plans_that_cannot_run_fail_with_a_message(setup, ray_head, tmp_path):
    from runtime.errors import RuntimeInputError
    from runtime.ray_cluster import free_port, pool_size

    assert pool_size([2.0], None, None, 12) == (1, 2.0)  # default: one actor per node, all its CPUs
    assert pool_size([2.0, 4.0], 1, None, 3) == (3, 1.0)  # never more actors than lines
    for cpus_each, actors, needle in [(3, None, "fits on no node"), (1, 3, "fits 1 to 2")]:
        with pytest.raises(RuntimeInputError, match=needle):
            pool_size([2.0], cpus_each, actors, 12)  # an actor pool that could never start: refused up front
    out = tmp_path / "out"
    proc = run(*batch_cmd(setup, out, "--ray", f"127.0.0.1:{free_port()}")[2:], timeout=120)  # nothing there
    assert_one_line_error(proc, "cannot reach Ray at 127.0.0.1:")
    # no image within the timeout (here: the actors' start-up alone takes longer): a message, not a hang
    cmd = batch_cmd(setup, out, "--ray", ray_head.address, "--ray-timeout", "1")
    env = {**os.environ, **ray_head.env}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "made no progress for 1 s" in errors[0], proc.stderr
