"""Tiny test models: built from code, converted once, cached under .cache/tests/<key>/ (the key changes with
the code that builds and converts them, so a stale cache is never used)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "tests"
_SOURCES = ["tiny.py", "wrappers.py", "export.py", "check.py", "component.py", "pipeline.py", "source.py",
            "tokenizers.py", "clip_vocab.py", "clip_unicode.py"]  # fmt: skip


def cache_key() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        path = ROOT / "convert" / name
        if path.exists():
            h.update(path.read_bytes())
    for pkg in ("torch", "diffusers", "transformers", "openvino", "openvino-tokenizers"):
        h.update(version(pkg).encode())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _building(out: Path):
    """One builder at a time per cached folder, across test sessions (the others wait, then reuse it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.build-lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def source_dir(kind: str, seed: int = 0) -> Path:
    """The diffusers folder of a tiny model (built on first use)."""
    from convert.tiny import build_tiny_pipeline

    out = CACHE / cache_key() / f"{kind}-s{seed}-diffusers"
    with _building(out):
        if not (out / "model_index.json").is_file():
            build_tiny_pipeline(kind, out, seed=seed)
    return out


def tiny_autoencoder_dir(seed: int = 0) -> Path:
    """The diffusers folder of a random-weight AutoencoderTiny (convert.tiny.TINY_AUTOENCODER), built on first use."""
    from convert.tiny import build_tiny_autoencoder

    out = CACHE / cache_key() / f"taesd-s{seed}-diffusers"
    with _building(out):
        if not (out / "config.json").is_file():
            build_tiny_autoencoder(out, seed=seed)
    return out


def ov_dir(kind: str, weight_format: str = "fp32", seed: int = 0, timestep_dtype: str = "f32",
           tiny_vae: bool = False) -> Path:  # fmt: skip
    """The converted OpenVINO folder of a tiny model (converted on first use); timestep_dtype "i64" gives the
    UNet interface openvino.genai and optimum-intel call; tiny_vae: with the tiny autoencoder (--tiny-vae)."""
    from convert.pipeline import convert_pipeline

    suffix = ("" if timestep_dtype == "f32" else f"-{timestep_dtype}") + ("-taesd" if tiny_vae else "")
    out = CACHE / cache_key() / f"{kind}-s{seed}-ov-{weight_format}{suffix}"
    src = source_dir(kind, seed)
    tiny = str(tiny_autoencoder_dir(seed)) if tiny_vae else None
    with _building(out):
        if not (out / "model_index.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            convert_pipeline(str(src), out, weight_format=weight_format, timestep_dtype=timestep_dtype,
                             log=lambda s: None, isolate=False, tiny_vae=tiny)  # fmt: skip
    return out
