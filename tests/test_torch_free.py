"""The runtime works where torch, diffusers and transformers are not installed.

A second virtual environment gets the base install only (no extras; tests/venvs.py, shared with
test_python_versions.py); the runtime CLI runs there on a folder converted earlier in this test session and must
write the same picture as the runtime in this process.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import numpy as np
import pytest

from tests import venvs
from tests.models import ROOT

FORBIDDEN = ("torch", "diffusers", "transformers", "nncf", "convert")


@pytest.fixture(scope="module")
def venv_python():
    # base install only: openvino, openvino-tokenizers, numpy, pillow and our packages (non-editable), in a venv
    # of this interpreter's version, reused while pyproject.toml, runtime/ and schedulers/ are unchanged
    return venvs.base_venv(sys.executable)


def test_forbidden_packages_are_absent(venv_python):
    for pkg in ("torch", "diffusers", "transformers"):
        proc = subprocess.run([str(venv_python), "-c", f"import {pkg}"], capture_output=True, text=True)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, f"{pkg} is importable in the venv"


def test_generate_in_torch_free_venv(venv_python, tiny, tmp_path):
    _, ov_dir = tiny("base")
    out = tmp_path / "cat.png"
    args = ["--model", str(ov_dir), "--prompt", "a cat", "--negative-prompt", "dog", "--height", "128",
            "--width", "192", "--steps", "3", "--seed", "9", "--precision", "f32", "--cache-dir", "",
            "--output", str(out)]  # fmt: skip
    code = "import runpy, sys; sys.argv = ['generate'] + sys.argv[1:]; "
    code += "runpy.run_module('runtime.generate', run_name='__main__')"
    check = f"; import sys; bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; assert not bad, bad"
    proc = subprocess.run([str(venv_python), "-c", "import runtime.pipeline, schedulers" + check], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(venv_python), "-c", code, *args], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    from tests.parity import our_pipe

    ref = our_pipe(str(ov_dir))(prompt="a cat", negative_prompt="dog", height=128, width=192, num_inference_steps=3,
                                seed=9).images[0]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), ref)


@pytest.mark.parametrize("package", ["runtime", "schedulers"])
def test_imports_are_torch_free(package):
    """Static check of every import in runtime/ and schedulers/."""
    allowed = {"numpy", "openvino", "openvino_tokenizers", "PIL", "runtime", "schedulers", "safetensors"}
    allowed |= set(sys.stdlib_module_names)
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(ROOT).as_posix()
        extra = set().union(*(names for prefix, names in OPTIONAL.items() if rel.startswith(prefix)))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed | extra, f"{rel} imports {name}"


# optional extras, and the only places that may import them (never torch & co.)
OPTIONAL = {"runtime/serve/": {"starlette", "uvicorn", "multipart", "python_multipart", "ray"}}


def test_base_import_path_has_no_extras():
    """`import runtime`, the pipeline and the CLI never load an optional extra (the server's web stack, ray)."""
    extras = sorted(set().union(*OPTIONAL.values()) | {"ray"})
    code = "import sys, runtime, runtime.pipeline, runtime.generate, schedulers; "
    code += f"print([m for m in {extras!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
