"""`python -m runtime.serve --ray`: deploy runtime.serve.ray_app on a Ray cluster (started here on 127.0.0.1 when
no --address is given) with Serve's HTTP proxy on --host:--port, and keep it up until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from runtime.errors import RuntimeInputError


def build(args, serve):
    """The Serve application: the job board, a deployment per model, the ingress."""
    from runtime.serve.ray_app import Ingress, JobBoard, ModelReplica

    board = serve.deployment(JobBoard, name="jobs", num_replicas=1, ray_actor_options={"num_cpus": 0}).bind()
    scale = ({"autoscaling_config": {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                     "target_ongoing_requests": 1, "upscale_delay_s": 2, "downscale_delay_s": 60}}
             if args.min_replicas is not None else {"num_replicas": args.replicas})  # fmt: skip
    options = dict(device=args.device, precision=args.precision, cache_dir=args.cache_dir, low_memory=args.low_memory,
                   preview=args.preview, warmup=not args.no_warmup,
                   lora_dir=str(Path(args.lora_dir).resolve()) if args.lora_dir else None)  # fmt: skip
    models = {}
    for name, path in args.model:
        path = str(Path(path).resolve())  # each replica's machine must have it there (or a shared path)
        refiner = args.refiner.get(name)
        opts = dict(options, refiner=str(Path(refiner).resolve()) if refiner else None)
        models[name] = serve.deployment(
            ModelReplica, name=f"model-{name}", ray_actor_options={"num_cpus": args.cpus_per_replica},
            max_ongoing_requests=1, max_queued_requests=-1, health_check_period_s=2, health_check_timeout_s=30,
            graceful_shutdown_timeout_s=5, **scale,
        ).bind(name, path, opts, board)  # fmt: skip
    limits = dict(max_size=args.max_size, max_steps=args.max_steps, max_n=args.max_n, max_body_mb=args.max_body_mb,
                  timeout=args.timeout, queue_size=args.queue_size)  # fmt: skip
    info = {"limits": limits, "replicas": args.max_replicas or args.replicas, "api_key": args.api_key,
            "preview": args.preview, "cors_origins": args.cors_origin, "lora_dir": options["lora_dir"],
            "refiners": {m: Path(p.rstrip("/")).name for m, p in args.refiner.items()}}  # fmt: skip
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)  # fmt: skip
    return ingress.bind(models, board, info)


def main(args) -> int:
    from runtime import ray_cluster

    try:
        ray = ray_cluster.connect(args.address)
        serve = ray_cluster.import_ray("ray.serve")
        serve.start(http_options={"host": args.host, "port": args.port}, detached=False)
        serve.run(build(args, serve), name="sdxl", route_prefix="/", blocking=False)
    except RuntimeInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a deployment that failed (a bad folder in a replica): one line
        first = str(e).strip().splitlines()
        print(f"error: the deployment failed: {first[-1] if first else type(e).__name__}", file=sys.stderr)
        return 2
    port = args.port
    print(f"serving {', '.join(n for n, _ in args.model)} on http://{args.host}:{port}/ (Ray Serve)", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
