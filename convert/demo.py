"""python -m convert.demo: the embedded default model, end to end.

No real weights can be downloaded here, so this builds a tiny SDXL-architecture pipeline with RANDOM weights
(its picture is structured noise, not art), converts it to OpenVINO, and generates a PNG with the torch-free
runtime, exactly as a real checkpoint would go.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(".cache/demo"), help="where the models and the PNG go")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dawn, oil painting")
    args = p.parse_args(argv)
    from convert.pipeline import convert_pipeline
    from convert.tiny import build_tiny_pipeline

    src = args.out / "tiny-sdxl-random-weights"
    ov_dir = args.out / "tiny-sdxl-random-weights-ov"
    print("embedded default: a tiny SDXL-architecture model with RANDOM weights (not trained)")
    if not (src / "model_index.json").is_file():
        build_tiny_pipeline("base", src, seed=0)
    if not (ov_dir / "model_index.json").is_file():
        convert_pipeline(str(src), ov_dir, weight_format="fp16", overwrite=True)
    png = args.out / "demo.png"
    cmd = [sys.executable, "-m", "runtime.generate", "--model", str(ov_dir), "--prompt", args.prompt,
           "--height", "512", "--width", "768", "--steps", "20", "--seed", "42", "--output", str(png)]  # fmt: skip
    print("$", shlex.join(cmd))  # quoted: it can be pasted into a shell
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
