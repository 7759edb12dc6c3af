"""The server on Ray Serve (`python -m runtime.serve --ray`): the same app, routes, responses and errors as the
single-process server, its models in replicas spread over the cluster.

- `ModelReplica` (a deployment per model, `--replicas N` or autoscaled between `--min-replicas` and
  `--max-replicas` on ongoing requests): one compiled pipeline and the single-process server's worker; OpenVINO
  runs with as many threads as the CPUs Ray gives the replica. One request at a time per replica
  (max_ongoing_requests=1): the CPU is the bound, as in one process.
- `JobBoard` (one replica, no CPU): each job's progress and live preview as its replica reports them after every
  step, and the interrupt and cancel flags it reads back in the same call: how /sdapi/v1/progress and
  /sdapi/v1/interrupt reach the replica that holds a job.
- `Ingress` (no CPU): the Starlette app of runtime.serve.app over `RemoteWorker`s, which queue with the same
  bound as the local worker (429 past it) and call the model's deployment handle.

A replica that dies mid-image (killed, out of memory) is restarted by Serve; its in-flight request answers 503 in
the API's error shape and a retry goes to a live replica.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from runtime.serve.jobs import Cancelled, Job, ModelWorker, Outcome, QueueFull
from runtime.serve.metrics import Metrics
from runtime.serve.requests import ApiError, Limits

BOARD_TTL = 600.0  # seconds a finished job's entry stays on the board


class JobBoard:
    def __init__(self):
        self.jobs: dict[str, dict] = {}

    def report(self, job_id: str, **fields) -> dict:
        """A replica's progress report -> the flags its job must obey ({"cancel": reason, "interrupt": bool})."""
        entry = self.jobs.setdefault(job_id, {})
        entry.update(fields, updated=time.time())
        return {"cancel": entry.get("cancel"), "interrupt": bool(entry.get("interrupt"))}

    def get(self, job_id: str) -> dict | None:
        now = time.time()
        for old in [k for k, v in self.jobs.items() if now - v.get("updated", now) > BOARD_TTL]:
            del self.jobs[old]
        return self.jobs.get(job_id)

    def flag(self, job_id: str, key: str, value) -> None:
        self.jobs.setdefault(job_id, {"updated": time.time()})[key] = value


class ModelReplica:
    def __init__(self, name: str, path: str, options: dict, board):
        import openvino as ov
        import ray

        from runtime.pipeline import SDXLPipeline

        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        core = ov.Core()
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": cpus})  # the CPUs Ray gives this replica
        pipe = SDXLPipeline(path, core=core, device=options.get("device", "CPU"), precision=options.get("precision"),
                            cache_dir=options.get("cache_dir", "default"), low_memory=options.get("low_memory", False),
                            refiner=options.get("refiner"))  # fmt: skip
        self.name, self.board, self.preview = name, board, options.get("preview", "approx")
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._reports: dict = {}  # job id -> its last progress report to the board (a DeploymentResponse)
        from runtime.serve.loras import LoraLibrary

        self.worker = ModelWorker(
            name, pipe, queue_size=1 << 10, metrics=Metrics(), loras=LoraLibrary(options.get("lora_dir"))
        )
        self.worker.start(warmup=options.get("warmup", True))
        self.worker.ready.wait()  # healthy (and deployed) once compiled
        if self.worker.warmup_error:
            raise RuntimeError(f"model {name}: {self.worker.warmup_error}")

    def whoami(self) -> dict:
        return {"replica": self.replica, "pid": os.getpid()}

    def _report(self, job: Job) -> None:
        """After each step, in the worker's thread: progress and preview to the board, its flags back."""
        preview = None
        if job.preview_of is not None and job.last is not None:
            from runtime.serve.a1111 import preview_png

            preview = preview_png(job.preview_of, job.last)
        # Not waited for in the denoising loop: the flags come back with the previous step's report (a cancel or
        # an interrupt takes effect one step later), so a step never waits for a round trip to the board.
        previous = self._reports.get(job.id)
        self._reports[job.id] = self.board.report.remote(job.id, step=job.step, total=job.total, state=job.state,
                                                         replica=self.replica, preview=preview)  # fmt: skip
        try:
            flags = previous.result(timeout_s=0) if previous is not None else None
        except TimeoutError:  # the board has not answered yet: next step
            flags = None
        if flags and flags["cancel"]:
            job.cancel(flags["cancel"])
        if flags and flags["interrupt"]:
            job.interrupted = True

    async def generate(self, job_id: str, kwargs: dict, kind: str, loras: list | None = None) -> Outcome:
        job = Job(self.name, kwargs, kind, id=job_id, loras=loras)
        job.on_step = self._report
        job.started = time.perf_counter()
        self.worker.submit(job)
        try:
            outcome = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:  # the ingress gave up on it: stop at the next step
            self.worker.withdraw(job, "disconnected")
            raise
        finally:
            self._reports.pop(job_id, None)
            self.board.report.remote(job_id, state=job.state, replica=self.replica, preview=None)
        outcome.result.latents = None  # not sent back: the images are what the routes answer with
        outcome.replica = self.replica
        return outcome


class RemoteWorker:
    """runtime.serve.jobs.ModelWorker's interface over a model deployment's handle (in the ingress)."""

    def __init__(self, name: str, handle, board, queue_size: int, replicas: int, has_refiner: bool, metrics: Metrics):
        self.name, self.handle, self.board, self.metrics = name, handle, board, metrics
        self.queue_size, self.replicas, self.has_refiner = queue_size, replicas, has_refiner
        self._jobs: dict[str, Job] = {}
        self._calls: dict[str, object] = {}
        self.warmup_error = None
        self.ready = _Ready()

    @property
    def running(self) -> Job | None:
        return next((j for j in self._jobs.values() if j.state == "running"), None)

    def depth(self) -> int:
        return sum(1 for j in self._jobs.values() if j.state == "queued")

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def submit(self, job: Job) -> Job:
        if len(self._jobs) >= self.queue_size + self.replicas:
            per_image = self.metrics.mean_image_seconds(self.name) or 10.0
            raise QueueFull(self.name, max(1, round(per_image * (self.depth() + 1) / self.replicas)))
        self._jobs[job.id] = job
        self._calls[job.id] = asyncio.ensure_future(self._call(job))
        return job

    async def _call(self, job: Job) -> None:
        t = time.perf_counter()
        try:
            outcome = await self.handle.generate.remote(job.id, job.kwargs, job.kind, job.loras)
            job.state = "interrupted" if outcome.interrupted else "done"
            self.metrics.observe_image(self.name, (time.perf_counter() - t) / max(len(outcome.result.images), 1))
            _settle(job, outcome)
        except asyncio.CancelledError:
            _settle(job, exc=Cancelled(job.cancel_reason or "disconnected"))
        except Exception as e:  # noqa: BLE001 - a replica that died, or the library's own error, raised remotely
            job.state = "failed"
            _settle(job, exc=_remote_error(e))
        finally:
            self._jobs.pop(job.id, None)
            self._calls.pop(job.id, None)

    def withdraw(self, job: Job, reason: str) -> None:
        job.cancel(reason)
        self.board.flag.remote(job.id, "cancel", reason)
        call = self._calls.get(job.id)
        if call is not None:
            call.cancel()

    def interrupt(self, job: Job) -> None:
        job.interrupted = True
        self.board.flag.remote(job.id, "interrupt", True)

    async def refresh(self, job: Job) -> None:
        entry = await self.board.get.remote(job.id)
        if entry:
            job.step, job.total = entry.get("step", job.step), entry.get("total", job.total)
            job.preview_b64 = entry.get("preview") or job.preview_b64
            job.replica = entry.get("replica") or job.replica
            if entry.get("state") == "running" and job.state == "queued":
                job.state, job.started = "running", time.perf_counter()

    def stop(self) -> None:
        for call in list(self._calls.values()):
            call.cancel()


class _Ready:
    def is_set(self) -> bool:
        return True


def _settle(job: Job, outcome: Outcome | None = None, exc: BaseException | None = None) -> None:
    if job.future.done():
        return
    if exc is not None:
        job.future.set_exception(exc)
    else:
        job.future.set_result(outcome)


def _remote_error(e: BaseException) -> BaseException:
    """A RayTaskError wraps the replica's exception: the library's input errors stay 400s; a replica that died
    is a 503 the client may retry."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, (ValueError, TypeError, Cancelled)):
        return cause
    name = type(e).__name__
    if "ActorDied" in name or "ActorUnavailable" in name or "RayActorError" in name or "Unavailable" in name:
        return ApiError(503, "the model replica running this request died; retry (Ray Serve restarts it)", None,
                        "replica_failed", {"Retry-After": "5"})  # fmt: skip
    first = str(cause or e).strip().splitlines()
    return ApiError(500, f"generation failed: {first[-1] if first else name}", None, "server_error")


class Ingress:
    def __init__(self, models: dict, board, info: dict):
        self.models, self.board, self.info = models, board, info

    def __serve_build_asgi_app__(self):
        from runtime.serve.app import Server, create_app

        info, metrics = self.info, Metrics()
        workers = {name: RemoteWorker(name, handle, self.board, info["limits"]["queue_size"], info["replicas"],
                                      name in info["refiners"], metrics)
                   for name, handle in self.models.items()}  # fmt: skip
        server = Server(workers, Limits(**info["limits"]), metrics, info.get("api_key"), info.get("preview", "approx"))
        server.refiners = dict(info["refiners"])
        from runtime.serve.loras import LoraLibrary

        server.loras = LoraLibrary(info.get("lora_dir"))
        return create_app(server, info.get("cors_origins"))
