"""Virtual environments holding the project's base install (no extras), for tests that run the torch-free
runtime outside this interpreter.

One venv per Python minor version, `.cache/tests/venv-py3X`, reused across test sessions. A marker file in it
records what it was installed from:
- the base interpreter (a different interpreter, or one that is gone, makes a new venv);
- a hash of the base install's dependencies in pyproject.toml (a change installs them again, which resolves
  them against what the venv has);
- a hash of pyproject.toml and the runtime/ and schedulers/ sources (a change reinstalls only the project,
  `pip install --no-deps --force-reinstall`, without resolving the dependencies again; from a copy of the
  checkout, so that setuptools' build/ and egg-info are not left in it).
Nothing changed: the venv is used as it is, without calling pip.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from tests.models import CACHE, ROOT

PACKAGES = ("runtime", "schedulers")  # what the base install ships that the venv runs (convert/ needs torch)
MARKER = "sdxl-openvino-install.json"
_PIP = ["-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-input"]
_ABOUT = "import sys; print(sys.version.split()[0], sys.base_prefix)"


def dependencies() -> list[str]:
    """The base install's requirements, as pyproject.toml lists them."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def deps_hash() -> str:
    return hashlib.sha256(json.dumps(dependencies()).encode()).hexdigest()[:16]


def project_hash(root: Path = ROOT) -> str:
    h = hashlib.sha256((root / "pyproject.toml").read_bytes())
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _copy_project(tmp: Path) -> Path:
    """What the wheel is built from, copied: setuptools then writes its build/ and egg-info there, not in the
    checkout, where a module deleted since an earlier build would linger in build/ and be packaged again."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    out = tmp / "src"
    out.mkdir()
    for name in ("pyproject.toml", meta["project"]["readme"]):
        shutil.copy2(ROOT / name, out / name)
    for package in dict.fromkeys(p.split(".")[0] for p in meta["tool"]["setuptools"]["packages"]):  # with subpackages
        shutil.copytree(ROOT / package, out / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


def _runs(python: str | Path, minor: int) -> bool:
    try:
        proc = subprocess.run([str(python), "-c", "import sys, venv; print(sys.version_info[1])"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip() == str(minor)


def find_python(minor: int) -> Path | None:
    """An interpreter for Python 3.<minor>: this one, else pyenv's newest 3.<minor>.x, else python3.<minor> on
    PATH; None where the machine has none."""
    if sys.version_info[:2] == (3, minor):
        return Path(sys.executable)
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = [p for p in versions.glob(f"3.{minor}.*") if p.name.replace(".", "").isdigit()]
    found.sort(key=lambda p: [int(x) for x in p.name.split(".")], reverse=True)
    candidates = [p / "bin" / "python" for p in found]
    on_path = shutil.which(f"python3.{minor}")
    candidates += [Path(on_path)] if on_path else []
    return next((c for c in candidates if _runs(c, minor)), None)


def base_venv(python: str | Path = sys.executable, log=print) -> Path:
    """The python of `.cache/tests/venv-py3X` (X: python's minor version) with the base install of this
    checkout, made or brought up to date as needed (see the module docstring)."""
    about = subprocess.run([str(python), "-c", _ABOUT], capture_output=True, text=True, check=True).stdout.strip()
    minor = about.split()[0].split(".")[1]
    venv = CACHE / f"venv-py3{minor}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "venvs.lock", "w") as lock:  # test sessions of one checkout take turns
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _update(venv, python, about, log)


def _update(venv: Path, python: str | Path, about: str, log) -> Path:
    venv_python = venv / "bin" / "python"
    marker = venv / MARKER
    want = {"python": about, "deps": deps_hash(), "project": project_hash()}
    try:
        have = json.loads(marker.read_text())
    except (OSError, ValueError):
        have = {}
    if have == want and venv_python.exists():
        return venv_python
    if have.get("python") != about or not venv_python.exists():
        log(f"creating {venv.relative_to(ROOT)} from {python} ({about.split()[0]})")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
        have = {}
    marker.unlink(missing_ok=True)  # an install that fails half-way leaves no marker: the next run does it again
    if have.get("deps") != want["deps"]:
        deps = dependencies()
        log(f"{venv.name}: pip install {' '.join(deps)}")
        subprocess.run([str(venv_python), *_PIP, *deps], check=True, cwd=CACHE)
    log(f"{venv.name}: pip install --no-deps --force-reinstall {ROOT}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        src = _copy_project(Path(tmp))
        subprocess.run([str(venv_python), *_PIP, "--no-deps", "--force-reinstall", str(src)], check=True, cwd=tmp)
        want["project"] = project_hash(src)  # what was installed, should the checkout have changed meanwhile
    marker.write_text(json.dumps(want))
    return venv_python
