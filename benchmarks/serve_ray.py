"""Throughput of the server on Ray Serve (measured, never asserted): images/s with 1 and with 2 model replicas of 1
CPU each on a local 2-CPU cluster bound to 127.0.0.1, against the single-process server (2 threads) in the same
run; each configuration sent the same requests by 2 concurrent clients.

    python -m benchmarks.serve_ray [--model DIR] [--size 128] [--steps 20] [--requests 12]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time

from benchmarks.machine import matmul_gflops


def _rate(server, body: dict, n: int, clients: int = 2) -> tuple[float, set]:
    def one(i: int):
        status, _, r = server.call("/sdapi/v1/txt2img", dict(body, seed=i))
        assert status == 200, r
        return json.loads(r["info"]).get("replica")

    server.call("/sdapi/v1/txt2img", dict(body, seed=10_000))  # warm: each replica compiled at start already
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        replicas = set(pool.map(one, range(n)))
    return n / (time.perf_counter() - t), replicas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--requests", type=int, default=12)
    args = ap.parse_args(argv)
    from runtime.ray_cluster import HeadNode, free_port
    from tests import models
    from tests.serving import LiveServer
    from tests.test_serve_ray import RayServer

    model = args.model or str(models.ov_dir("base"))
    mm = matmul_gflops()
    print(f"matmul 4096^3 (this run): OpenVINO {mm['openvino_bf16']:.0f} bf16 / {mm['openvino_f32']:.0f} f32 GFLOP/s")
    body = {"prompt": "a lighthouse", "steps": args.steps, "width": args.size, "height": args.size}
    local = LiveServer("--model", f"m={model}")
    try:
        rate, _ = _rate(local, body, args.requests)
        print(f"single process (2 threads): {rate:.3f} images/s")
    finally:
        local.stop()
    with HeadNode(num_cpus=2) as head:
        for replicas in (1, 2):
            server = RayServer(head.address, free_port(), "--model", f"m={model}", "--replicas", replicas,
                               "--cpus-per-replica", 1)  # fmt: skip
            try:
                rate, seen = _rate(server, body, args.requests)
                print(f"Ray Serve, {replicas} replica(s) x 1 CPU: {rate:.3f} images/s ({len(seen)} replicas answered)")
            finally:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
