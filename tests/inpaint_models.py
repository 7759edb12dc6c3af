"""The tiny 9-channel inpainting model of tests/test_inpaint.py: the tiny SDXL base with a 9-channel UNet
(diffusers/stable-diffusion-xl-1.0-inpainting-0.1's layout: latents, mask, masked-image latents), random
weights, built and converted once under .cache/tests/<key>/ (tests.models' cache key and build lock)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests import models


def inpaint_dirs(seed: int = 0) -> tuple[Path, Path]:
    """(diffusers folder, fp32 OpenVINO folder) of the tiny inpainting model."""
    from convert.pipeline import convert_pipeline
    from convert.tiny import build_tiny_pipeline

    root = models.CACHE / models.cache_key()
    src, out = root / f"inpaint9-s{seed}-diffusers", root / f"inpaint9-s{seed}-ov-fp32"
    with models._building(src):
        if not (src / "model_index.json").is_file():
            build_tiny_pipeline("base", src, seed=seed, unet_overrides={"in_channels": 9})
    with models._building(out):
        if not (out / "model_index.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            convert_pipeline(str(src), out, weight_format="fp32", log=lambda s: None, isolate=False)
    return src, out


if __name__ == "__main__":  # build everything tests/test_inpaint.py uses
    print(inpaint_dirs())
    for kind in ("base", "refiner", "lcm"):
        print(models.ov_dir(kind))
