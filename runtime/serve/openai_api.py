"""OpenAI's Images API: POST /v1/images/generations (JSON) and /v1/images/edits (multipart: image-to-image), GET
/v1/models; with the extension fields openvino model server's image endpoint takes (negative_prompt, prompt_2,
negative_prompt_2, num_inference_steps, guidance_scale, rng_seed, strength). Unknown fields are refused, as
OpenAI refuses them. Seeds as the CLI's default seed mode ("per-image"): image i of `n` is made with seed + i.
"""

from __future__ import annotations

import json
import time

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.serve import requests as rq
from runtime.serve.app import Server, json_body, pngs_b64
from runtime.serve.jobs import Job
from runtime.serve.loras import from_field
from runtime.serve.requests import ApiError, bad

EXTENSIONS = ("negative_prompt", "prompt_2", "negative_prompt_2", "num_inference_steps", "guidance_scale", "rng_seed",
              "strength", "loras")  # fmt: skip
OPENAI = ("model", "prompt", "n", "size", "response_format", "quality", "style", "user", "output_format",
          "background", "moderation", "output_compression")  # fmt: skip
EDIT_ONLY = ("image", "image[]", "mask", "input_fidelity")


def _check_fields(body: dict, allowed: tuple[str, ...]) -> None:
    for key in body:
        if key not in allowed:
            raise bad(f"Unrecognized request argument supplied: {key}", key)
    if body.get("response_format", "b64_json") not in ("b64_json", None):
        raise bad("response_format must be b64_json: this server returns images in the response, not as URLs",
                  "response_format")  # fmt: skip
    if body.get("output_format", "png") not in ("png", None):
        raise bad("output_format must be png", "output_format")
    for key in ("quality", "style", "background", "moderation", "user"):  # accepted for compatibility; no effect
        if body.get(key) is not None and not isinstance(body[key], str):
            raise bad(f"{key} must be a string", key)


def _kwargs(server: Server, body: dict) -> dict:
    lim = server.limits
    width, height = rq.openai_size(body.get("size"), lim)
    return dict(
        prompt=rq.text(body, "prompt", required=True),
        negative_prompt=rq.text(body, "negative_prompt"),
        prompt_2=rq.text(body, "prompt_2"),
        negative_prompt_2=rq.text(body, "negative_prompt_2"),
        num_images_per_prompt=rq.integer(body, "n", 1, lim.max_n, 1),
        num_inference_steps=rq.integer(body, "num_inference_steps", 1, lim.max_steps),
        guidance_scale=rq.number(body, "guidance_scale", 0.0, 100.0),
        seed=rq.seed(body.get("rng_seed"), "rng_seed"),
        seed_mode="per-image",
        width=width,
        height=height,
        preview=server.preview,
    )


def _loras(server: Server, body: dict) -> list | None:
    """The `loras` extension field (JSON, or JSON text in a multipart form); None when the server has no LoRAs."""
    value = body.get("loras")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise bad("loras must be JSON", "loras") from None
    if server.loras.dir is None:
        if value:
            raise bad("this server has no --lora-dir", "loras")
        return None
    return from_field(value, server.loras)


async def _respond(server: Server, request: Request, route: str, body: dict, kwargs: dict, kind: str) -> Response:
    worker = server.worker(body.get("model"))
    job = Job(worker.name, kwargs, kind, loras=_loras(server, body))
    outcome = await server.run(request, worker, job, route)
    if outcome is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    data = [{"b64_json": b64} for b64 in await pngs_b64(outcome)]
    server.metrics.count(route, "interrupted" if outcome.interrupted else "ok")
    r = outcome.result
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": "png",
                         "size": f"{r.images.shape[2]}x{r.images.shape[1]}"})  # fmt: skip


def routes(server: Server) -> list[Route]:
    async def generations(request: Request):
        route = "/v1/images/generations"
        try:
            body = await json_body(request)
            _check_fields(body, OPENAI + EXTENSIONS)
            if "strength" in body:
                raise bad("strength applies to /v1/images/edits (an image to start from)", "strength")
            kwargs = _kwargs(server, body)
            return await _respond(server, request, route, body, kwargs, "txt2img")
        except ApiError:
            server.metrics.count(route, "rejected")
            raise

    async def edits(request: Request):
        route = "/v1/images/edits"
        try:
            ctype = request.headers.get("content-type", "")
            if not ctype.startswith("multipart/form-data"):
                raise ApiError(415, "expected multipart/form-data (an image file and the fields)", None,
                               "unsupported_media_type")  # fmt: skip
            try:
                form = await request.form(max_files=4, max_fields=64)
            except Exception as e:  # noqa: BLE001 - python-multipart's errors: a malformed body
                raise bad(f"unreadable multipart body ({type(e).__name__})") from None
            try:
                files = [v for k in ("image", "image[]") for v in form.getlist(k)]
                body = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile) and k not in EDIT_ONLY}
                _check_fields(body, OPENAI + EXTENSIONS + EDIT_ONLY)
                if len(files) != 1 or not isinstance(files[0], UploadFile):
                    raise bad("send exactly one image file (field image)", "image")
                data = await files[0].read()
                masks = form.getlist("mask")
                if len(masks) > 1 or (masks and not isinstance(masks[0], UploadFile)):
                    raise bad("mask must be one image file", "mask")
                mask = await masks[0].read() if masks else None
            finally:
                await form.close()
            kwargs = _kwargs(server, body)
            im = rq.decode_image(data, server.limits, "image")
            width, height = kwargs.pop("width"), kwargs.pop("height")
            kwargs["image"] = rq.init_image(im, width, height, server.limits, "image")
            if mask is not None:  # inpainting: the transparent pixels of the mask are repainted
                m = rq.openai_mask(rq.decode_image(mask, server.limits, "mask"))
                if m.size != kwargs["image"].size:
                    raise bad(f"mask is {m.size[0]}x{m.size[1]} but the image is {im.size[0]}x{im.size[1]}", "mask")
                kwargs["mask_image"] = m
                kwargs["width"], kwargs["height"] = (x - x % 8 for x in m.size)  # the image's size, not the model's
            strength = rq.number(body, "strength", 0.0, 1.0)
            if strength is not None:  # else the library's img2img default
                kwargs["strength"] = strength
            return await _respond(server, request, route, body, kwargs, "img2img")
        except ApiError:
            server.metrics.count(route, "rejected")
            raise

    async def models(request: Request):
        now = int(time.time())
        data = [{"id": n, "object": "model", "created": now, "owned_by": "sdxl-openvino"} for n in server.workers]
        return JSONResponse({"object": "list", "data": data})

    return [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
