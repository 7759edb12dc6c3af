"""The base install works on every Python OpenVINO ships wheels for, not only the 3.11 the build-time extras need.

For each of Python 3.10 to 3.13 found on the machine, a venv (`.cache/tests/venv-py3X`, reused while nothing it
installs has changed: tests/venvs.py) gets `pip install .` without extras; its `sdxl-ov-generate` console script
must write, from the tiny model converted in this session, the picture the runtime in this process computes,
bit for bit. Cold (four venvs to make) this takes minutes, and it downloads each Python's wheels once.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests import venvs

MINORS = (10, 11, 12, 13)
PARAMS = dict(prompt="a cat", negative_prompt="dog", height=128, width=192, num_inference_steps=3, seed=9)


@pytest.fixture(scope="module")
def reference(tiny):
    from tests.parity import our_pipe

    _, ov_dir = tiny("base")
    return ov_dir, our_pipe(str(ov_dir))(**PARAMS).images[0]


def _run(cmd, cwd, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("minor", MINORS, ids=[f"py3{m}" for m in MINORS])
def test_base_install_generates_on_python(minor, request, tmp_path):
    python = venvs.find_python(minor)
    if python is None:
        pytest.skip(f"Python 3.{minor} is not on this machine (neither $PYENV_ROOT/versions/3.{minor}.* "
                    f"nor python3.{minor} on PATH)")  # fmt: skip
    venv_python = venvs.base_venv(python)
    bin_dir = venv_python.parent
    # the venv's own interpreter, and our packages from its site-packages (not from the checkout)
    proc = _run([venv_python, "-c", "import sys, runtime, schedulers; print(sys.version_info[1]); "
                 "print(runtime.__file__); print(schedulers.__file__)"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    version, *files = proc.stdout.split()
    assert version == str(minor)
    assert all(Path(f).is_relative_to(venv_python.parents[1]) for f in files), files

    ov_dir, ref = request.getfixturevalue("reference")  # after the skip: no tiny model for a missing Python
    out = tmp_path / "cat.png"
    args = ["--model", ov_dir, "--prompt", PARAMS["prompt"], "--negative-prompt", PARAMS["negative_prompt"],
            "--height", PARAMS["height"], "--width", PARAMS["width"], "--steps", PARAMS["num_inference_steps"],
            "--seed", PARAMS["seed"], "--precision", "f32", "--cache-dir", "", "--output", out, "--quiet"]  # fmt: skip
    proc = _run([bin_dir / "sdxl-ov-generate", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), ref)

    # the converter's console script is installed too; it parses its arguments without torch
    proc = _run([bin_dir / "sdxl-ov-convert", "--help"], tmp_path)
    assert proc.returncode == 0 and "--weight-format" in proc.stdout, proc.stderr
