"""The ASGI app: the OpenAI and A1111 routes (runtime.serve.openai_api, runtime.serve.a1111), health, readiness,
metrics, the page, and what every route shares: the API key, the body limit, running a job for a request.

A request's job is queued on its model's worker (runtime.serve.jobs); the route waits for it, for the client
to disconnect (the job is withdrawn: dropped from the queue, or stopped at its next step) or for the time limit
(504). Errors answer in the route's API's shape, one line, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
from pathlib import Path

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from runtime.errors import RuntimeInputError
from runtime.image import png_info, png_text
from runtime.serve.jobs import Cancelled, Job, ModelWorker, Outcome, QueueFull
from runtime.serve.metrics import Metrics
from runtime.serve.requests import ApiError, Limits

STATIC = Path(__file__).with_name("static")


class Server:
    """The models (a worker each), the limits and the counters one app serves."""

    def __init__(self, workers: dict[str, ModelWorker], limits: Limits, metrics: Metrics,
                 api_key: str | None = None, preview: str = "approx"):  # fmt: skip
        self.workers, self.limits, self.metrics = workers, limits, metrics
        self.api_key, self.preview = api_key, preview
        self.default_model = next(iter(workers))
        self.options: dict = {}  # A1111's /sdapi/v1/options (the checkpoint requests use by default)
        self.refiners: dict[str, str] = {}  # model name -> the name of the refiner it is served with
        from runtime.serve.loras import LoraLibrary

        self.loras = LoraLibrary(None)  # --lora-dir: the adapters requests may name

    def worker(self, name: str | None, param: str = "model") -> ModelWorker:
        if name in (None, ""):
            return self.workers[self.default_model]
        if not isinstance(name, str) or name not in self.workers:
            raise ApiError(404, f"unknown model {name!r}; this server has: {', '.join(self.workers)}", param,
                           "model_not_found")  # fmt: skip
        return self.workers[name]

    def find(self, job_id: str | None) -> Job | None:
        """A job by id; None: the running job that started last (A1111's one-job-at-a-time view)."""
        jobs = [j for w in self.workers.values() for j in w.jobs()]
        if job_id:
            return next((j for j in jobs if j.id == job_id), None)
        running = [j for j in jobs if j.state == "running"]
        return max(running, key=lambda j: j.started or 0, default=None)

    async def run(self, request: Request, worker: ModelWorker, job: Job, route: str) -> Outcome | None:
        """Queue `job` and wait for it: its Outcome, None when the client went away (the job withdrawn), or an
        ApiError (429 queue full, 504 time limit, 400 bad parameters, 503 shutting down, 500 failed)."""
        try:
            worker.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), None, "queue_full", {"Retry-After": str(e.retry_after)}) from None
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {result, gone}, timeout=self.limits.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:  # the request's task cancelled (Ray Serve's proxy: the client went away)
            worker.withdraw(job, "disconnected")
            gone.cancel()
            self.metrics.count(route, "disconnected")
            raise
        if result not in done:
            reason = "disconnected" if gone in done else "timeout"
            worker.withdraw(job, reason)
            result.cancel()
            gone.cancel()
            self.metrics.count(route, reason)
            if reason == "timeout":
                raise ApiError(504, f"the request took more than {self.limits.timeout:g} s (the server's --timeout)",
                               None, "timeout")  # fmt: skip
            return None
        gone.cancel()
        try:
            return result.result()
        except Cancelled as e:
            raise ApiError(503, f"the job was cancelled ({e.reason})", None, "cancelled") from None
        except (RuntimeInputError, ValueError, TypeError) as e:
            raise ApiError(400, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ApiError(500, f"generation failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                           None, "server_error") from None  # fmt: skip


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the ASGI receive channel's http.disconnect, after the body)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def png_bytes(image, parameters: dict) -> bytes:
    """The PNG a CLI run writes for the same image and parameters, byte for byte (runtime.image.save_png)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=png_info(png_text(parameters)))
    return buf.getvalue()


async def pngs_b64(outcome: Outcome) -> list[str]:
    r = outcome.result

    def encode() -> list[str]:
        return [base64.b64encode(png_bytes(im, p)).decode() for im, p in zip(r.images, r.image_parameters, strict=True)]

    return await run_in_threadpool(encode)


# -- errors, auth, the body limit ----------------------------------------------------------------------------------
def error_response(path: str, e: ApiError) -> Response:
    """OpenAI's {"error": {...}} on /v1, A1111's {"error", "detail"} on /sdapi, {"detail"} elsewhere."""
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    elif path.startswith("/sdapi/"):
        body = {"error": _reason(e.status), "detail": e.message, "body": "", "errors": e.message}
    else:
        body = {"detail": e.message}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def _reason(status: int) -> str:
    return {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge", 415: "UnsupportedMedia",
            429: "TooManyRequests", 503: "Unavailable", 504: "Timeout"}.get(status, "ServerError")  # fmt: skip


class Guard:
    """ASGI middleware: the API key (Bearer, as OpenAI clients send it; or HTTP Basic with the key as the
    password, so that a browser can open the page) on every route but /health, and the body size limit."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.server.api_key
        if key and path != "/health" and not _authorized(headers.get("authorization", ""), key):
            e = ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", None, "invalid_api_key",
                         {"WWW-Authenticate": 'Basic realm="sdxl-openvino", charset="UTF-8"'})  # fmt: skip
            return await error_response(path, e)(scope, receive, send)
        limit = int(self.server.limits.max_body_mb * 2**20)
        length = headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is larger than {self.server.limits.max_body_mb:g} MB "
                             "(the server's --max-body-mb)", None, "body_too_large")  # fmt: skip
        if length.isdigit() and int(length) > limit:
            return await error_response(path, too_large)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await error_response(path, too_large)(scope, receive, send)


class _TooLarge(Exception):
    pass


def _authorized(header: str, key: str) -> bool:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), key.encode())
    if scheme.lower() == "basic":
        try:
            password = base64.b64decode(value.strip()).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), key.encode())
    return False


# -- health, readiness, metrics, the page -------------------------------------------------------------------------
def create_app(server: Server, cors_origins: list[str] | None = None) -> Starlette:
    from runtime.serve import a1111, openai_api

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def ready(request: Request):
        models = {}
        for name, w in server.workers.items():
            models[name] = "ready" if w.ready.is_set() and not w.warmup_error else (w.warmup_error or "loading")
        ok = all(v == "ready" for v in models.values())
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "models": models}, status_code=200 if ok else 503
        )

    async def metrics(request: Request):
        depth = lambda: {n: w.depth() for n, w in server.workers.items()}  # noqa: E731
        running = lambda: {n: int(w.running is not None) for n, w in server.workers.items()}  # noqa: E731
        return PlainTextResponse(server.metrics.render(depth, running), media_type="text/plain; version=0.0.4")

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/ready", ready),
        Route("/metrics", metrics),
        *openai_api.routes(server),
        *a1111.routes(server),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    async def api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e)

    async def not_found(request: Request, e):
        status = getattr(e, "status_code", 404)
        message = "no such route" if status == 404 else ("method not allowed" if status == 405 else str(e))
        return error_response(request.url.path, ApiError(status, f"{request.method} {request.url.path}: {message}"))

    async def server_error(request: Request, e: Exception):  # the server keeps serving; the client gets one line
        return error_response(request.url.path, ApiError(500, f"internal error: {type(e).__name__}"))

    middleware = [Middleware(Guard, server=server)]
    if cors_origins:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                                        allow_headers=["Authorization", "Content-Type"]))  # fmt: skip
    handlers = {ApiError: api_error, 404: not_found, 405: not_found, 500: server_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


async def json_body(request: Request) -> dict:
    """The request's JSON object, or a 400/415 with the reason."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json":
        raise ApiError(415, f"expected application/json, got {ctype}", None, "unsupported_media_type")
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body
