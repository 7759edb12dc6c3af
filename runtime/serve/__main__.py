"""python -m runtime.serve --model DIR: the web page, the OpenAI Images API and A1111's API on one port.

Needs the `[serve]` extra (starlette, uvicorn, python-multipart): `pip install 'sdxl-openvino[serve]'`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

ENV_API_KEY = "SDXL_OPENVINO_API_KEY"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _named(value: str, what: str) -> tuple[str, str]:
    """NAME=DIR or DIR (named after the folder)."""
    name, sep, path = value.partition("=")
    if not sep:
        name, path = Path(value.rstrip("/")).name or value, value
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{what} {value!r}: expected NAME=DIR or DIR")
    return name, path


def _refiner(value: str) -> tuple[str | None, str]:
    """NAME=DIR (the refiner of model NAME) or DIR (of the first model)."""
    name, sep, path = value.partition("=")
    return (name, path) if sep and name and path else (None, value)


def parse_args(argv=None) -> argparse.Namespace:
    from runtime.serve.requests import Limits

    d = Limits()
    ap = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        action="append",
        required=True,
        type=lambda v: _named(v, "--model"),
        help="a converted folder, as DIR or NAME=DIR (repeatable; the first is the default model)",
    )
    ap.add_argument("--refiner", action="append", default=[], type=_refiner,
                    help="a refiner folder for the first model (DIR) or for model NAME (NAME=DIR); "
                    "every request to that model then runs base -> refiner")  # fmt: skip
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's; 0: any free port)")
    ap.add_argument(
        "--api-key",
        default=os.environ.get(ENV_API_KEY),
        help=f"required as 'Authorization: Bearer KEY' on every route but /health (default ${ENV_API_KEY})",
    )
    ap.add_argument(
        "--cors-origin", action="append", default=[], help="allow this browser origin (CORS; off by default)"
    )
    ap.add_argument("--max-size", type=int, default=d.max_size, help=f"largest width or height (default {d.max_size})")
    ap.add_argument(
        "--max-steps", type=int, default=d.max_steps, help=f"most steps a request may ask (default {d.max_steps})"
    )
    ap.add_argument("--max-n", type=int, default=d.max_n, help=f"most images per request (default {d.max_n})")
    ap.add_argument(
        "--max-body-mb", type=float, default=d.max_body_mb, help=f"largest request body (default {d.max_body_mb:g})"
    )
    ap.add_argument(
        "--timeout", type=float, default=d.timeout, help=f"seconds a request may wait and run (default {d.timeout:g})"
    )
    ap.add_argument(
        "--queue-size",
        type=int,
        default=d.queue_size,
        help=f"jobs that may wait per model; more get 429 (default {d.queue_size})",
    )
    ap.add_argument(
        "--preview",
        choices=("approx", "tiny", "none"),
        default="approx",
        help="live previews for /sdapi/v1/progress and the page (tiny: the folder's tiny VAE)",
    )
    ap.add_argument("--device", default="CPU")
    ap.add_argument("--precision", choices=("f32", "bf16", "f16"), default=None)
    ap.add_argument("--cache-dir", default="default", help="OpenVINO's model cache (default: the runtime's)")
    ap.add_argument("--low-memory", action="store_true", help="compile each model per stage and release it after")
    ap.add_argument("--lora-dir", default=None, help="LoRA files (*.safetensors) requests may name: A1111's "
                    "<lora:NAME:WEIGHT> in a prompt, `loras` on the OpenAI routes")  # fmt: skip
    ap.add_argument("--no-warmup", action="store_true", help="compile at the first request instead of at start")
    r = ap.add_argument_group("Ray Serve (the [ray] extra)")
    r.add_argument("--ray", action="store_true", help="deploy on Ray Serve: model replicas over the cluster")
    r.add_argument("--address", default=None, help="a running Ray cluster (HOST:PORT of its head, or auto); "
                   "default: start one on this machine, bound to 127.0.0.1")  # fmt: skip
    r.add_argument("--replicas", type=int, default=1, help="replicas per model (default 1)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many replicas ...")
    r.add_argument("--max-replicas", type=int, default=None, help="... up to this many, on ongoing requests")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray gives each model replica "
                   "(its OpenVINO threads; default 1)")  # fmt: skip
    args = ap.parse_args(argv)
    for flag in ("max_size", "max_steps", "max_n", "queue_size"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_size % 8:
        ap.error("--max-size must be a multiple of 8")
    if not (args.timeout > 0 and args.max_body_mb > 0):
        ap.error("--timeout and --max-body-mb must be positive")
    if not 0 <= args.port < 65536:
        ap.error("--port must be 0..65535")
    if not args.ray and (args.address or args.min_replicas or args.max_replicas or args.replicas != 1):
        ap.error("--address, --replicas, --min-replicas and --max-replicas need --ray")
    if args.replicas < 1 or args.cpus_per_replica <= 0:
        ap.error("--replicas must be at least 1 and --cpus-per-replica positive")
    if (args.min_replicas is None) != (args.max_replicas is None):
        ap.error("--min-replicas and --max-replicas go together")
    if args.min_replicas is not None and not 1 <= args.min_replicas <= args.max_replicas:
        ap.error("need 1 <= --min-replicas <= --max-replicas")
    names = [n for n, _ in args.model]
    if len(set(names)) != len(names):
        ap.error(f"--model names must differ: {names}")
    args.refiner = {name or names[0]: path for name, path in args.refiner}
    for name in args.refiner:
        if name not in names:
            ap.error(f"--refiner {name}=...: no --model is named {name!r}")
    return args


def build(args):
    """-> (the app, the Server): every folder loaded (one line on a bad one), a worker per model."""
    from runtime.errors import RuntimeInputError
    from runtime.pipeline import SDXLPipeline
    from runtime.serve.app import Server, create_app
    from runtime.serve.jobs import ModelWorker
    from runtime.serve.metrics import Metrics
    from runtime.serve.requests import Limits

    limits = Limits(args.max_size, args.max_steps, args.max_n, args.max_body_mb, args.timeout, args.queue_size)
    from runtime.serve.loras import LoraLibrary

    library = LoraLibrary(args.lora_dir)
    if args.lora_dir and not library.dir.is_dir():
        raise RuntimeInputError(f"--lora-dir {args.lora_dir}: not a folder")
    metrics, workers = Metrics(), {}
    for name, path in args.model:
        pipe = SDXLPipeline(path, device=args.device, precision=args.precision, cache_dir=args.cache_dir,
                            low_memory=args.low_memory, refiner=args.refiner.get(name))  # fmt: skip
        if args.preview == "tiny":
            pipe.tiny_vae.require()
        workers[name] = ModelWorker(name, pipe, args.queue_size, metrics, library)
    server = Server(workers, limits, metrics, args.api_key, args.preview)
    server.loras = library
    server.refiners = {model: Path(path.rstrip("/")).name for model, path in args.refiner.items()}
    return create_app(server, args.cors_origin), server


def main(argv=None) -> int:
    from runtime.errors import RuntimeInputError

    args = parse_args(argv)
    if args.ray:
        from runtime.serve.ray_deploy import main as ray_main

        return ray_main(args)
    try:
        import uvicorn
    except ImportError:
        print("error: the server needs the serve extra: pip install 'sdxl-openvino[serve]'", file=sys.stderr)
        return 2
    try:
        app, server = build(args)
    except (RuntimeInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections wait in the backlog until the app starts; none is refused
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who reaches it can use it", file=sys.stderr)
    for worker in server.workers.values():
        worker.start(warmup=not args.no_warmup)
    url_host = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"serving {', '.join(server.workers)} on http://{url_host}:{port}/", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, limit_concurrency=1000)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for worker in server.workers.values():
            worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
