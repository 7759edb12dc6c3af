"""The server's cost, measured (never asserted): requests/s and p50/p95 latency at 1 and 8 concurrent clients,
and the server's overhead over the library's own time per image (the same generation in this process,
interleaved with the server's requests, medians).

    python -m benchmarks.serve_load [--model DIR] [--size 256] [--steps 20] [--requests 16] [--pairs 7]

Without --model it uses the tiny test model (tests/models.py builds it once into .cache/tests/).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import statistics
import sys
import time

from benchmarks.machine import matmul_gflops


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--pairs", type=int, default=7, help="interleaved library/server pairs for the overhead")
    args = ap.parse_args(argv)
    from runtime.pipeline import SDXLPipeline
    from tests import models
    from tests.serving import LiveServer

    model = args.model or str(models.ov_dir("base"))
    mm = matmul_gflops()
    print(f"matmul 4096^3 (this run): OpenVINO {mm['openvino_bf16']:.0f} bf16 / {mm['openvino_f32']:.0f} f32 GFLOP/s")
    server = LiveServer("--model", f"m={model}", "--queue-size", "64", "--max-size", str(max(args.size, 512)))
    try:
        kw = dict(prompt="a lighthouse", num_inference_steps=args.steps, height=args.size, width=args.size)
        body = {"prompt": kw["prompt"], "steps": args.steps, "width": args.size, "height": args.size, "seed": 1}
        pipe = SDXLPipeline(model)
        pipe(seed=0, **kw)  # compiled in both processes before timing
        assert server.call("/sdapi/v1/txt2img", body)[0] == 200
        lib, srv = [], []
        for i in range(args.pairs):  # interleaved: the machine's drift hits both alike
            t = time.perf_counter()
            pipe(seed=i, **kw)
            lib.append(time.perf_counter() - t)
            t = time.perf_counter()
            status, _, r = server.call("/sdapi/v1/txt2img", dict(body, seed=i))
            srv.append(time.perf_counter() - t)
            assert status == 200 and base64.b64decode(r["images"][0])[:4] == b"\x89PNG"
        ml, ms = statistics.median(lib), statistics.median(srv)
        print(
            f"{args.size}x{args.size}, {args.steps} steps: library {ml:.3f} s/image, server request {ms:.3f} s "
            f"(median of {args.pairs} interleaved pairs): server / library = {ms / ml:.3f}"
        )
        for clients in (1, 8):

            def one(i: int) -> float:
                t = time.perf_counter()
                status = server.call("/sdapi/v1/txt2img", dict(body, seed=1000 + i))[0]
                assert status == 200, status
                return time.perf_counter() - t

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                lat = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t0
            p50, p95 = _percentile(lat, 0.5), _percentile(lat, 0.95)
            print(
                f"{clients} client(s): {args.requests / wall:.2f} requests/s, latency p50 {p50:.3f} s, p95 {p95:.3f} s"
            )
    finally:
        server.stop()
    _load(model, body)
    return 0


def _load(model: str, body: dict, clients: int = 40, queue: int = 8) -> None:
    """The load test's figures: `clients` concurrent requests against a queue of `queue`: answered 200 / 429,
    none lost or doubled, RSS before and after (after three more requests)."""
    from tests.serving import LiveServer

    server = LiveServer("--model", f"m={model}", "--queue-size", str(queue), "--max-size", "512")
    try:
        for i in range(3):
            server.call("/sdapi/v1/txt2img", dict(body, seed=i))
        before = server.rss()
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            answers = list(
                pool.map(lambda i: server.call("/sdapi/v1/txt2img", dict(body, seed=100 + i)), range(clients))
            )
        wall = time.perf_counter() - t
        codes = [a[0] for a in answers]
        for i in range(3):
            server.call("/sdapi/v1/txt2img", dict(body, seed=300 + i))
        after = server.rss()
        print(
            f"load: {clients} concurrent clients, queue {queue}: {codes.count(200)} images, {codes.count(429)} x 429, "
            f"{len(codes) - codes.count(200) - codes.count(429)} other, in {wall:.2f} s; RSS {before / 2**20:.0f} MiB "
            f"before, {after / 2**20:.0f} MiB after ({after / before:.3f}x)"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
