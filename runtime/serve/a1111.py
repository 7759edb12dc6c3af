"""AUTOMATIC1111's web UI API (/sdapi/v1/...), the one desktop and chat front-ends speak: txt2img, img2img,
progress (with the live preview), interrupt, sd-models, samplers, schedulers, options.

A1111's seeds: image i of a request is made with seed + i (our seed_mode "per-image"), so each image of a batch
is the one-image request with its own seed. A1111 fields this runtime cannot honour (hires fix, face
restoration, tiling, scripts, variation seeds) are refused with a 400 when switched on, never silently ignored;
fields that change nothing here (save_images, sampler eta, ...) are accepted.
"""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.image import A1111_SAMPLERS, a1111_parameters
from runtime.params import GenerationParams
from runtime.serve import requests as rq
from runtime.serve.app import Server, json_body, pngs_b64
from runtime.serve.jobs import Job
from runtime.serve.loras import from_prompt
from runtime.serve.requests import ApiError, bad

UNSUPPORTED = {  # field: (the value that means "off", what it is)
    "enable_hr": (False, "hires fix"),
    "restore_faces": (False, "face restoration"),
    "tiling": (False, "tiling"),
    "script_name": (None, "scripts"),
    "subseed_strength": (0, "variation seeds"),
}


def _model_name(server: Server, body: dict) -> str:
    """override_settings.sd_model_checkpoint, else the options' checkpoint; A1111 titles ("name [hash]") too."""
    override = body.get("override_settings") or {}
    if not isinstance(override, dict):
        raise bad("override_settings must be an object", "override_settings")
    name = override.get("sd_model_checkpoint") or server.options["sd_model_checkpoint"]
    if isinstance(name, str) and name not in server.workers:
        name = name.split(" [")[0]
    return server.worker(name, "sd_model_checkpoint").name


def _kwargs(server: Server, body: dict, img2img: bool) -> tuple[dict, int, list | None]:
    lim = server.limits
    for key, (off, what) in UNSUPPORTED.items():
        if body.get(key, off) not in (off, None, False, 0, ""):
            raise bad(f"{key}: {what} is not supported by this server", key)
    if body.get("alwayson_scripts"):
        raise bad("alwayson_scripts: extensions are not supported by this server", "alwayson_scripts")
    if body.get("styles"):
        raise bad("styles: saved prompt styles are not supported by this server", "styles")
    batch = rq.integer(body, "batch_size", 1, lim.max_n, 1)
    n_iter = rq.integer(body, "n_iter", 1, lim.max_n, 1)
    if batch * n_iter > lim.max_n:
        raise bad(f"batch_size x n_iter = {batch * n_iter} images, more than {lim.max_n} (the server's --max-n)",
                  "batch_size")  # fmt: skip
    width, height = rq.size(rq.integer(body, "width", 8, 1 << 16), rq.integer(body, "height", 8, 1 << 16), lim,
                            "width")  # fmt: skip
    name = body.get("sampler_name") or body.get("sampler_index")
    override = body.get("override_settings") or {}
    clip_stop = rq.integer(override, "CLIP_stop_at_last_layers", 1, 12, None, "CLIP_stop_at_last_layers")
    prompt, loras = rq.text(body, "prompt") or "", None
    if server.loras.dir is not None:  # A1111's <lora:NAME:WEIGHT> tags, out of the prompt
        prompt, loras = from_prompt(prompt, server.loras)
    kwargs = dict(
        prompt=prompt,
        negative_prompt=rq.text(body, "negative_prompt"),
        num_inference_steps=rq.integer(body, "steps", 1, lim.max_steps),
        guidance_scale=rq.number(body, "cfg_scale", 0.0, 100.0),
        seed=rq.seed(body.get("seed"), "seed"),
        num_images_per_prompt=batch * n_iter,
        seed_mode="per-image",
        scheduler=rq.sampler(name, body.get("scheduler")),
        width=width,
        height=height,
        preview=server.preview,
    )
    if clip_stop is not None and clip_stop > 1:  # A1111's "clip skip" 2 = diffusers' clip_skip 1
        kwargs["clip_skip"] = clip_stop - 1
    if "prompt_syntax" in GenerationParams.names():  # A1111's weighting syntax on A1111's routes
        kwargs["prompt_syntax"] = "a1111"
    switch = rq.number(body, "refiner_switch_at", 0.0, 1.0)
    if body.get("refiner_checkpoint") not in (None, "", "None"):
        worker = server.worker(_model_name(server, body))
        if not worker.has_refiner or body["refiner_checkpoint"] != server.refiners.get(worker.name):
            raise bad(f"refiner_checkpoint {body['refiner_checkpoint']!r}: model {worker.name!r} is served with "
                      f"{server.refiners.get(worker.name) or 'no refiner'}", "refiner_checkpoint")  # fmt: skip
        if switch is not None and 0 < switch < 1:
            kwargs["high_noise_frac"] = switch
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise bad("init_images must be a list of one base64 image", "init_images")
        if body.get("resize_mode", 0) not in (0, None):
            raise bad("resize_mode: only 0 (just resize) is supported", "resize_mode")
        im = rq.decode_image(images[0], lim, "init_images")
        kwargs["image"] = rq.init_image(im, kwargs.pop("width"), kwargs.pop("height"), lim, "init_images")
        kwargs["strength"] = rq.number(body, "denoising_strength", 0.0, 1.0, 0.75)
        if body.get("mask") not in (None, ""):
            kwargs.update(_inpainting(body, kwargs["image"], lim))
    return kwargs, batch, loras


def _inpainting(body: dict, image, lim) -> dict:
    """A1111's inpainting fields -> the library's: mask (white = repaint; inpainting_mask_invert), mask_blur
    (A1111's default 4), inpaint_full_res (+ inpaint_full_res_padding, default 32) = padding_mask_crop. The masked
    area starts from the original image (inpainting_fill 1, "original", what diffusers does); A1111's other fills
    are refused rather than run differently."""
    fill = rq.integer(body, "inpainting_fill", 0, 3, None)
    if fill not in (None, 1):
        raise bad(f"inpainting_fill {fill}: only 1 (original) is supported", "inpainting_fill")
    mask = rq.decode_image(body["mask"], lim, "mask").convert("L")
    if mask.size != image.size:
        mask = mask.resize(image.size, resample=Image.LANCZOS)  # A1111 resizes the mask with the image
    if rq.integer(body, "inpainting_mask_invert", 0, 1, 0):
        mask = Image.eval(mask, lambda v: 255 - v)
    w, h = (x - x % 8 for x in image.size)  # the image's size (diffusers' inpainting defaults to the model's)
    out = {
        "mask_image": mask,
        "mask_blur": rq.number(body, "mask_blur", 0.0, 64.0, 4.0) or None,
        "width": w,
        "height": h,
    }
    if body.get("inpaint_full_res") in (True, 1):
        out["padding_mask_crop"] = rq.integer(body, "inpaint_full_res_padding", 0, 1024, 32)
    return out


def _info(outcome, kwargs: dict, model: str, batch: int) -> dict:
    r = outcome.result
    p = r.parameters
    seeds = [q.get("seed") for q in r.image_parameters]
    return {
        "prompt": p.get("prompt"), "all_prompts": [p.get("prompt")] * len(seeds),
        "negative_prompt": p.get("negative_prompt") or "",
        "all_negative_prompts": [p.get("negative_prompt") or ""] * len(seeds),
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": int(r.images.shape[2]), "height": int(r.images.shape[1]), "sampler_name": p.get("sampler"),
        "cfg_scale": p.get("guidance_scale"), "steps": p.get("num_inference_steps"), "batch_size": batch,
        "denoising_strength": p.get("strength"), "clip_skip": (p.get("clip_skip") or 0) + 1,
        "sd_model_name": model, "restore_faces": False, "styles": [], "index_of_first_image": 0,
        "infotexts": [a1111_parameters(q) for q in r.image_parameters], "interrupted": outcome.interrupted,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": "sdxl-openvino",
        "sdxl_openvino": r.image_parameters,  # every setting of each image, as its PNG's JSON chunk
        "replica": getattr(outcome, "replica", None),  # on Ray Serve: which replica made it
    }  # fmt: skip


def routes(server: Server) -> list[Route]:
    server.options = {"sd_model_checkpoint": server.default_model, "samples_format": "png",
                      "CLIP_stop_at_last_layers": 1}  # fmt: skip

    def generation(img2img: bool):
        route = "/sdapi/v1/img2img" if img2img else "/sdapi/v1/txt2img"

        async def endpoint(request: Request):
            try:
                body = await json_body(request)
                kwargs, batch, loras = _kwargs(server, body, img2img)
                worker = server.worker(_model_name(server, body))
            except ApiError:
                server.metrics.count(route, "rejected")
                raise
            job = Job(worker.name, kwargs, "img2img" if img2img else "txt2img", loras=loras)
            if isinstance(body.get("force_task_id"), str) and 0 < len(body["force_task_id"]) <= 64:
                job.id = body["force_task_id"]  # what /sdapi/v1/progress?id_task= and the page follow
            try:
                outcome = await server.run(request, worker, job, route)
            except ApiError:
                server.metrics.count(route, "failed")
                raise
            if outcome is None:
                return Response(status_code=499)
            images = await pngs_b64(outcome) if body.get("send_images", True) else []
            server.metrics.count(route, "interrupted" if outcome.interrupted else "ok")
            params = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
            info = _info(outcome, kwargs, worker.name, batch)
            return JSONResponse({"images": images, "parameters": params, "info": json.dumps(info)})

        return endpoint

    async def progress(request: Request):
        job = server.find(request.query_params.get("id_task"))
        if job is not None:
            await server.workers[job.model].refresh(job)
        skip_image = request.query_params.get("skip_current_image", "false").lower() == "true"
        if job is None:
            state = {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                     "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
            return JSONResponse({"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                                 "textinfo": None})  # fmt: skip
        elapsed = time.perf_counter() - job.started if job.started else 0.0
        p = job.progress
        eta = elapsed / p - elapsed if p > 0 else 0.0
        queued = sum(w.depth() + (w.running is not None) for w in server.workers.values())
        state = {"skipped": False, "interrupted": job.interrupted, "job": job.kind if job.state == "running" else "",
                 "job_count": queued, "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                 "job_no": 0, "sampling_step": job.step, "sampling_steps": job.total, "id_task": job.id,
                 "replica": job.replica, "queue_state": job.state}  # fmt: skip
        image = None if skip_image else await _preview(job)
        return JSONResponse({"progress": p, "eta_relative": eta, "state": state, "current_image": image,
                             "textinfo": f"step {job.step}/{job.total}" if job.total else job.state})  # fmt: skip

    async def interrupt(request: Request):
        job = server.find(request.query_params.get("id_task"))
        if job is not None:
            server.workers[job.model].interrupt(job)
        return JSONResponse({})

    async def sd_models(request: Request):
        return JSONResponse([{"title": n, "model_name": n, "hash": None, "sha256": None, "filename": n, "config": None}
                             for n in server.workers])  # fmt: skip

    async def samplers(request: Request):
        return JSONResponse([{"name": a, "aliases": [k], "options": {}} for k, a in A1111_SAMPLERS.items()])

    async def schedulers(request: Request):
        return JSONResponse([{"name": "automatic", "label": "Automatic", "aliases": None},
                             {"name": "karras", "label": "Karras", "aliases": None}])  # fmt: skip

    async def loras(request: Request):  # A1111's list; names only (no server path reaches a client)
        return JSONResponse([{"name": n, "alias": n, "path": f"{n}.safetensors", "metadata": {}}
                             for n in server.loras.names()])  # fmt: skip

    async def options(request: Request):
        if request.method == "POST":
            body = await json_body(request)
            if "sd_model_checkpoint" in body:
                name = body["sd_model_checkpoint"]
                name = name.split(" [")[0] if isinstance(name, str) and name not in server.workers else name
                server.options["sd_model_checkpoint"] = server.worker(name, "sd_model_checkpoint").name
            server.options |= {k: v for k, v in body.items() if k != "sd_model_checkpoint"}
            return JSONResponse(None)
        return JSONResponse(server.options)

    return [
        Route("/sdapi/v1/txt2img", generation(False), methods=["POST"]),
        Route("/sdapi/v1/img2img", generation(True), methods=["POST"]),
        Route("/sdapi/v1/progress", progress, methods=["GET"]),
        Route("/sdapi/v1/interrupt", interrupt, methods=["POST"]),
        Route("/sdapi/v1/skip", interrupt, methods=["POST"]),
        Route("/sdapi/v1/sd-models", sd_models, methods=["GET"]),
        Route("/sdapi/v1/samplers", samplers, methods=["GET"]),
        Route("/sdapi/v1/schedulers", schedulers, methods=["GET"]),
        Route("/sdapi/v1/options", options, methods=["GET", "POST"]),
        Route("/sdapi/v1/loras", loras, methods=["GET"]),
        Route("/sdapi/v1/refresh-loras", lambda request: JSONResponse(None), methods=["POST"]),  # listed live
    ]


def preview_png(gen, state) -> str | None:
    """The live preview of a generation's step (its previewer), as a base64 PNG; None when it makes none."""
    image = gen.preview(state)
    if image is None:
        return None
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(list(image), axis=1)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def _preview(job: Job) -> str | None:
    """A running job's live preview: made here for a local job, the replica's last one for a remote job."""
    from starlette.concurrency import run_in_threadpool

    gen, state = job.preview_of, job.last
    if gen is None or state is None:
        return job.preview_b64
    return await run_in_threadpool(preview_png, gen, state)
