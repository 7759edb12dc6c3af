"""Cost per extra 75-token prompt chunk (issue 20): text encoding and one guided UNet call at 77 vs 154 tokens.

    python -m benchmarks.prompt_chunks [--model DIR] [--size 512] [--repeats 5]

Without --model it uses the tiny `mid` model of the tests (tests.models.ov_dir("mid"), built on first use).
Prints medians in seconds: encode (plain 77 tokens; compel syntax with 1 and 2 chunks; the negative padded to
the same length) and the UNet call at batch 2 (classifier-free guidance) for each sequence length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _median(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default=None)
    args = ap.parse_args(argv)
    if args.model is None:
        from tests.models import ov_dir

        args.model = str(ov_dir("mid"))
    from runtime.pipeline import SDXLPipeline
    from runtime.text import encode_prompt

    pipe = SDXLPipeline(args.model, precision=args.precision)
    short = "a lighthouse on a cliff at dawn, (golden light)1.2, waves"
    long = ", ".join(f"a {c} stone on the shore" for c in ("red", "green", "blue", "grey", "white") * 3)
    negative = "blurry, (lowres)0.8"

    def enc(prompt, syntax):
        return encode_prompt(pipe.text_encoders, prompt, None, negative, None, 1, True, True, None, syntax)

    rows = {}
    rows["encode plain (77)"] = _median(lambda: enc(short, "plain"), args.repeats)
    rows["encode compel 1 chunk (77)"] = _median(lambda: enc(short, "compel"), args.repeats)
    emb = enc(long, "compel")
    assert emb.embeds.shape[1] == 154, emb.embeds.shape
    rows["encode compel 2 chunks (154)"] = _median(lambda: enc(long, "compel"), args.repeats)
    f = pipe.info.vae_scale_factor
    h = args.size // f
    dim = emb.embeds.shape[-1]
    for n in (77, 154):
        inputs = {
            "sample": np.zeros((2, pipe.info.in_channels, h, h), np.float32),
            "timestep": np.array([500.0], np.float32),
            "encoder_hidden_states": np.random.default_rng(0).standard_normal((2, n, dim)).astype(np.float32),
            "text_embeds": np.zeros((2, emb.pooled.shape[-1]), np.float32),
            "time_ids": np.tile(np.array([args.size, args.size, 0, 0, args.size, args.size], np.float32), (2, 1)),
        }
        inputs = {k: v for k, v in inputs.items() if k in pipe.unet.input_names}
        rows[f"UNet call batch 2, {n} tokens, {args.size}px"] = _median(lambda i=inputs: pipe.unet(i), args.repeats)
    print(f"model {args.model}, precision {pipe.precision}, median of {args.repeats}")
    for k, v in rows.items():
        print(f"{k:40s} {v:.4f} s")


if __name__ == "__main__":
    main()
