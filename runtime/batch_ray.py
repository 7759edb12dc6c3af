"""runtime.batch --ray: the lines still to make as a Ray Data pipeline; the driver writes what comes back.

ray.data.from_items(lines) (one block per line, no read stage: a read that needs a CPU of its own next to a pool
holding every CPU waits forever) -> map_batches(Renderer) on an actor pool sized from the cluster's CPUs
(runtime.ray_cluster.pool_size), each actor one compiled pipeline with OpenVINO's threads = the CPUs it holds.
Workers return PNG bytes; only the driver writes files and the manifest (runtime.batch_output), so the output
folder need not be shared and a killed run resumes as a local one does. A plan that makes no progress for
--ray-timeout seconds fails with Ray Data's ExecutionTimeoutError (DataContext.execution_no_progress_timeout_s).
"""

from __future__ import annotations

import json
import logging
import re

from runtime import ray_cluster
from runtime.batch_output import BatchFailed
from runtime.errors import RuntimeInputError


class Renderer:
    """map_batches' stateful callable: the pipeline compiled once per actor, then one image per row."""

    def __init__(self, settings: dict, threads: int):
        from runtime.batch import open_pipeline

        self.pipe = open_pipeline(settings, threads)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from runtime.batch import render

        outcomes = [render(self.pipe, json.loads(str(job))) for job in batch["job"]]
        return {
            "line": np.array([o["line"] for o in outcomes], dtype=np.int64),
            "name": np.array([o["name"] for o in outcomes], dtype=object),
            "png": np.array([o.get("png", b"") for o in outcomes], dtype=object),
            "entry": np.array([json.dumps(o.get("entry")) for o in outcomes], dtype=object),
            "error": np.array([o.get("error", "") for o in outcomes], dtype=object),
        }


def _outcome(row: dict) -> dict:
    outcome = {"line": int(row["line"]), "name": str(row["name"])}
    if row["error"]:
        return {**outcome, "error": str(row["error"])}
    return {**outcome, "png": bytes(row["png"]), "entry": json.loads(row["entry"])}


def _root_message(e: BaseException) -> str:
    """The cause Ray wrapped (an actor that could not start, a failed task), as one line: the innermost
    `SomeError: message` line of the texts Ray chained, a RuntimeInputError's first."""
    texts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(f"{type(e).__name__}: {e}")
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    lines = [line.strip() for text in texts for line in text.splitlines()]
    found = [line for line in lines if re.match(r"(\w+\.)*\w+(Error|Exception): \S", line)]
    ours = [line for line in found if "RuntimeInputError: " in line]
    line = (ours or found or [texts[0]])[-1]
    return re.sub(r"^(\w+\.)*RuntimeInputError: ", "", line)


def run_ray(args, settings: dict, pending: list[dict], out, progress) -> None:
    from runtime.batch import write

    ray = ray_cluster.connect(args.ray or None)
    try:
        data = ray_cluster.import_ray("ray.data")
        actors, each = ray_cluster.pool_size(ray_cluster.node_cpus(ray), args.ray_cpus_per_actor, args.ray_actors,
                                             len(pending))  # fmt: skip
        if not args.quiet:
            progress.say(f"ray: {actors} actor(s) of {each:g} CPU(s) on {ray_cluster.node_cpus(ray)} CPUs")
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # our progress and error lines, not Ray Data's
        ctx = data.DataContext.get_current()
        ctx.execution_no_progress_timeout_s = args.ray_timeout
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ds = data.from_items([{"job": json.dumps(job)} for job in pending], override_num_blocks=len(pending))
        pool = data.ActorPoolStrategy(size=actors)  # one compiled pipeline per actor
        init = dict(settings=settings, threads=max(1, int(each)))  # OpenVINO's threads: the CPUs Ray gives it
        ds = ds.map_batches(Renderer, batch_size=1, batch_format="numpy", compute=pool, num_cpus=each,
                            fn_constructor_kwargs=init)  # fmt: skip
        try:
            for row in ds.iter_rows():
                write(out, _outcome(row), progress)
        except data.exceptions.ExecutionTimeoutError:
            raise BatchFailed(
                f"the Ray plan made no progress for {args.ray_timeout:g} s (no image finished; --ray-timeout): "
                "are the actors' CPUs free, is the model folder on every worker?"
            ) from None
        except (KeyboardInterrupt, OSError, RuntimeInputError):
            raise
        except Exception as e:  # an actor that could not start or a failed task, wrapped by Ray
            raise BatchFailed(f"the Ray run failed: {_root_message(e)}") from None
    finally:
        ray.shutdown()
