"""The machine's speed on the day: an OpenVINO MatMul's GFLOP/s, recorded next to every absolute time (this CPU's
speed drifts from day to day; ratios measured side by side are what the benchmarks compare)."""

from __future__ import annotations

import time

now = time.perf_counter


def matmul_gflops(n: int = 4096) -> dict:
    """GFLOP/s of an n^3 MatMul: numpy f32 (its BLAS) and OpenVINO in bf16 and f32, best of 3 each."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    flop = 2 * n**3
    out = {}
    best = min(seconds(lambda: a @ b) for _ in range(3))
    out["numpy_f32"] = flop / best / 1e9
    x = ops.parameter([n, n], ov.Type.f32)
    model = ov.Model([ops.matmul(x, ops.constant(b), False, False)], [x])
    for hint in ("bf16", "f32"):
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        request = compiled.create_infer_request()
        request.infer({0: a})
        out[f"openvino_{hint}"] = flop / min(seconds(lambda r=request: r.infer({0: a})) for _ in range(3)) / 1e9
    return out


def seconds(fn) -> float:
    t = now()
    fn()
    return now() - t
