"""Jobs: one bounded queue and one worker thread per model.

The CPU is compute-bound (OpenVINO already uses every core for one UNet call), so concurrency is a queue, not
parallel inference: each model's worker runs one generation at a time, in arrival order. A job is cancelled
while queued (it never starts) or while running (at its next denoising step): by its client disconnecting, by
its time limit, or by a server shutdown. An interrupt (A1111's /sdapi/v1/interrupt) ends a running job at its
next step and returns the image of the last step's predicted x0 (what its preview shows), as A1111 returns the
image it has when interrupted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.errors import RuntimeInputError
from runtime.serve.metrics import Metrics
from runtime.serve.requests import ApiError

if TYPE_CHECKING:
    from runtime.generation import GenerationResult
    from runtime.pipeline import SDXLPipeline


class QueueFull(Exception):
    def __init__(self, model: str, retry_after: int):
        super().__init__(f"the queue of model {model!r} is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """A job that stopped before its result: `reason` is "disconnected", "timeout" or "shutdown"."""

    def __init__(self, reason: str):
        super().__init__(f"cancelled ({reason})")
        self.reason = reason


@dataclass(eq=False)
class Job:
    model: str
    kwargs: dict  # GenerationParams keywords
    kind: str = "txt2img"  # "txt2img" | "img2img": what A1111's progress calls the job
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    created: float = field(default_factory=time.time)
    state: str = "queued"  # queued | running | done | failed | cancelled | interrupted
    step: int = 0  # steps done
    total: int = 0
    started: float | None = None
    last: Any = None  # the last StepState
    preview_of: Any = None  # the generation (its preview(state) makes the live preview)
    cancel_reason: str | None = None
    interrupted: bool = False
    on_step: Any = None  # called with the job after each step (a Ray replica reports progress through it)
    preview_b64: str | None = None  # a remote job's last preview (runtime.serve.ray_app)
    replica: str | None = None  # a remote job's replica, HOST:PID
    loras: list | None = None  # [(name, weight)] to make active before it runs (runtime.serve.loras); None: as is
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason

    @property
    def progress(self) -> float:
        return self.step / self.total if self.total else 0.0


@dataclass
class Outcome:
    """What a finished job gives its route: the library's result, and whether it was interrupted."""

    result: GenerationResult
    interrupted: bool = False
    seconds: float = 0.0


class ModelWorker:
    """One model's queue (at most `queue_size` jobs waiting) and the thread that runs them one at a time."""

    def __init__(self, name: str, pipe: SDXLPipeline, queue_size: int, metrics: Metrics, loras=None):
        self.name, self.pipe, self.queue_size, self.metrics = name, pipe, queue_size, metrics
        self.loras, self.loaded_loras = loras, set()  # runtime.serve.loras.LoraLibrary; adapter names loaded
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self.running: Job | None = None
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"model-{name}", daemon=True)

    def start(self, warmup: bool = True) -> None:
        self._warmup = warmup
        self._thread.start()

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def has_refiner(self) -> bool:
        return self.pipe.refiner is not None

    def interrupt(self, job: Job) -> None:
        job.interrupted = True

    async def refresh(self, job: Job) -> None:
        """Bring a job's progress up to date (a local job always is)."""

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stop:
                raise QueueFull(self.name, 60)
            if len(self._queue) >= self.queue_size:
                per_image = self.metrics.mean_image_seconds(self.name) or 10.0
                raise QueueFull(self.name, max(1, round(per_image * (len(self._queue) + 1))))
            self._queue.append(job)
            self._cond.notify()
        return job

    def withdraw(self, job: Job, reason: str) -> None:
        """Cancel a job: removed from the queue if it waits there, stopped at its next step if it runs."""
        job.cancel(reason)
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return
        self._finish(job, "cancelled", exc=Cancelled(reason))

    def jobs(self) -> list[Job]:
        with self._cond:
            return ([self.running] if self.running else []) + list(self._queue)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.cancel("shutdown")
            self._finish(job, "cancelled", exc=Cancelled("shutdown"))
        if self.running is not None:
            self.running.cancel("shutdown")
        self._thread.join(timeout=30)

    # -- the worker thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self._warmup:
            self._warm()
        self.ready.set()
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._queue.popleft()
                self.running = job
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.running = None

    def _warm(self) -> None:
        """Compile the text encoders, the UNet and the VAE decoder at the folder's default size: one step."""
        try:
            self.pipe.generate(prompt="", num_inference_steps=1, seed=0).result()
        except Exception as e:  # noqa: BLE001 - reported by /ready, not fatal: requests get the error themselves
            self.warmup_error = str(e).splitlines()[0] if str(e) else type(e).__name__

    def _run(self, job: Job) -> None:
        if job.cancel_reason is not None:
            return self._finish(job, "cancelled", exc=Cancelled(job.cancel_reason))
        job.state, job.started = "running", time.perf_counter()
        try:
            if job.loras is not None and self.loras is not None:
                from runtime.serve.loras import apply

                apply(self.pipe, self.loras, job.loras, self.loaded_loras)
            gen = self.pipe.generate(**job.kwargs)
            job.total, job.preview_of = gen.total, gen
            t_step = time.perf_counter()
            for state in gen:
                now = time.perf_counter()
                self.metrics.observe_step(self.name, now - t_step)
                t_step = now
                job.step, job.total, job.last = state.index + 1, state.total, state
                if job.on_step is not None:
                    job.on_step(job)
                if job.cancel_reason is not None:
                    raise Cancelled(job.cancel_reason)
                if job.interrupted and job.step < job.total:
                    return self._finish(job, "interrupted", Outcome(self._partial(gen, state), True))
            result = gen.result()
        except Cancelled as e:
            return self._finish(job, "cancelled", exc=e)
        except (RuntimeInputError, ValueError, TypeError, ApiError) as e:
            return self._finish(job, "failed", exc=e)
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the route answers 500 with a reason
            return self._finish(job, "failed", exc=e)
        seconds = time.perf_counter() - job.started
        self.metrics.observe_image(self.name, seconds / max(len(result.images), 1))
        self._finish(job, "done", Outcome(result, False, seconds))

    def _partial(self, gen, state) -> GenerationResult:
        """The result of an interrupted generation: the last step's predicted x0, decoded."""
        from runtime.generation import GenerationResult

        x0 = state.denoised if state.denoised is not None else state.latents
        pipe = self.pipe.refiner or self.pipe
        images = pipe.decode(np.asarray(x0, np.float32))
        params = dict(gen.params.public(), interrupted_at_step=state.index + 1, model=str(self.pipe.dir))
        return GenerationResult(x0, images, params, [params] * len(images))

    def _finish(self, job: Job, state: str, outcome: Outcome | None = None, exc: BaseException | None = None):
        job.state = state
        job.preview_of = None
        try:
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(outcome)
        except concurrent.futures.InvalidStateError:  # its route gave up on it (disconnected, timed out)
            pass
