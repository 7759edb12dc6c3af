"""Counters and sums for /metrics, in Prometheus' text exposition format (version 0.0.4)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable


def _labels(**kw: str) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in kw.items())  # fmt: skip
    return "{" + inner + "}" if inner else ""


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()  # (route, outcome)
        self.image_seconds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])  # sum, count
        self.step_seconds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])

    def count(self, route: str, outcome: str) -> None:
        with self._lock:
            self.requests[(route, outcome)] += 1

    def observe_image(self, model: str, seconds: float) -> None:
        with self._lock:
            s = self.image_seconds[model]
            s[0], s[1] = s[0] + seconds, s[1] + 1

    def observe_step(self, model: str, seconds: float) -> None:
        with self._lock:
            s = self.step_seconds[model]
            s[0], s[1] = s[0] + seconds, s[1] + 1

    def mean_image_seconds(self, model: str) -> float | None:
        with self._lock:
            total, n = self.image_seconds.get(model, (0.0, 0))
        return total / n if n else None

    def mean_step_seconds(self, model: str) -> float | None:
        with self._lock:
            total, n = self.step_seconds.get(model, (0.0, 0))
        return total / n if n else None

    def render(self, queue_depth: Callable[[], dict[str, int]], running: Callable[[], dict[str, int]]) -> str:
        out = [
            "# HELP sdxl_queue_depth Jobs waiting in a model's queue (not counting the running one).",
            "# TYPE sdxl_queue_depth gauge",
        ]
        out += [f"sdxl_queue_depth{_labels(model=m)} {n}" for m, n in sorted(queue_depth().items())]
        out += ["# HELP sdxl_jobs_running Jobs a model's worker is running (0 or 1).", "# TYPE sdxl_jobs_running gauge"]
        out += [f"sdxl_jobs_running{_labels(model=m)} {n}" for m, n in sorted(running().items())]
        out += ["# HELP sdxl_requests_total Requests by route and outcome.", "# TYPE sdxl_requests_total counter"]
        with self._lock:
            requests = sorted(self.requests.items())
            series = {"image": dict(self.image_seconds), "step": dict(self.step_seconds)}
        out += [f"sdxl_requests_total{_labels(route=r, outcome=o)} {n}" for (r, o), n in requests]
        for what, values in series.items():
            name = f"sdxl_{what}_seconds"
            out += [f"# HELP {name} Seconds per {what} (generation time only, queueing excluded).",
                    f"# TYPE {name} summary"]  # fmt: skip
            for model, (total, n) in sorted(values.items()):
                out += [f"{name}_sum{_labels(model=model)} {total:.6f}", f"{name}_count{_labels(model=model)} {n}"]
        return "\n".join(out) + "\n"
