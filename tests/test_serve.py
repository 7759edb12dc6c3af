"""The server's APIs against a live server on 127.0.0.1 with the tiny model: OpenAI's (with the official client),
A1111's, the job controls, health/ready/metrics, and the one-line 4xx errors it keeps serving after."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests import cli, models
from tests.serving import LiveServer

openai = pytest.importorskip("openai", reason="the openai client (the dev extra) is not installed")
pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")

SMALL = {"size": "64x64", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def model_dir():
    return models.ov_dir("base")


@pytest.fixture(scope="module")
def server(model_dir):
    s = LiveServer("--model", f"tiny={model_dir}", "--max-size", "512", "--max-n", "4")
    yield s
    log = s.stop()
    assert "Traceback" not in log, log  # hostile requests never crash a handler


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _png(b64: str) -> bytes:
    return base64.b64decode(b64)


def _cli_png(tmp_path, model_dir, *args) -> bytes:
    out = tmp_path / "cli.png"
    proc = cli.run("runtime.generate", "--model", model_dir, "--output", out, "--quiet", *args)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def test_openai_client_generate_equals_cli(client, model_dir, tmp_path):
    r = client.images.generate(
        model="tiny",
        prompt="a red lighthouse",
        size="64x64",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2, "rng_seed": 5, "negative_prompt": "fog", "guidance_scale": 4.0},
    )
    assert len(r.data) == 1
    png = _png(r.data[0].b64_json)
    assert png == _cli_png(
        tmp_path,
        model_dir,
        "--prompt",
        "a red lighthouse",
        "--negative-prompt",
        "fog",
        "--steps",
        2,
        "--seed",
        5,
        "--guidance-scale",
        4.0,
        "--height",
        64,
        "--width",
        64,
    )
    params = Image.open(io.BytesIO(png)).info["parameters"]  # A1111's chunk
    assert "Seed: 5" in params and "Steps: 2" in params


def test_openai_client_n_images_and_edit(client, model_dir, tmp_path):
    r = client.images.generate(
        model="tiny", prompt="two boats", n=2, size="64x64", extra_body={"num_inference_steps": 2, "rng_seed": 9}
    )
    assert len(r.data) == 2 and _png(r.data[0].b64_json) != _png(r.data[1].b64_json)
    start = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 72, 3), dtype=np.uint8)).save(start)
    with open(start, "rb") as f:
        e = client.images.edit(
            model="tiny",
            image=f,
            prompt="a painting",
            extra_body={"strength": 0.5, "num_inference_steps": 4, "rng_seed": 2},
        )
    png = _png(e.data[0].b64_json)
    assert Image.open(io.BytesIO(png)).size == (72, 64)
    cli_png = _cli_png(
        tmp_path, model_dir, "--prompt", "a painting", "--image", start, "--strength", 0.5, "--steps", 4, "--seed", 2
    )
    ours, theirs = (np.asarray(Image.open(io.BytesIO(b))) for b in (png, cli_png))
    assert np.array_equal(ours, theirs)  # the same picture (the JSON chunk names the image's source: path vs upload)


def test_openai_errors_in_openai_shape(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny", prompt="x", size="63x64")
    assert "multiple of 8" in e.value.body["message"] and e.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="nope", prompt="x", size="64x64")
    assert "unknown model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        client.images.generate(model="tiny", prompt="x", extra_body={"temperature": 1})
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(model="tiny", prompt="x", response_format="url")


def test_a1111_txt2img_seeds_info_and_cli(server, model_dir, tmp_path):
    body = {
        "prompt": "a (blue:1.2) door",
        "negative_prompt": "rust",
        "seed": 7,
        "batch_size": 2,
        "steps": 2,
        "cfg_scale": 6,
        "width": 64,
        "height": 64,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
    }
    status, _, r = server.call("/sdapi/v1/txt2img", body)
    assert status == 200, r
    info = json.loads(r["info"])
    assert info["all_seeds"] == [7, 8] and info["sampler_name"] == "DPM++ 2M Karras" and r["parameters"] == body
    assert "Seed: 8" in info["infotexts"][1] and info["sdxl_openvino"][1]["scheduler"] == "dpmpp_2m_karras"
    out = tmp_path / "a.png"
    flags = "--negative-prompt rust --seed 7 --num-images 2 --seed-mode per-image --steps 2 --guidance-scale 6 "
    flags += "--height 64 --width 64 --scheduler dpmpp_2m_karras --prompt-syntax a1111"  # A1111's weighting syntax
    prompt = ["--prompt", "a (blue:1.2) door"]
    proc = cli.run("runtime.generate", "--model", model_dir, "--output", out, "--quiet", *prompt, *flags.split())
    assert proc.returncode == 0, proc.stderr
    for i, b64 in enumerate(r["images"]):  # A1111's seeds are the CLI's per-image seed mode, byte for byte
        assert _png(b64) == (tmp_path / f"a-{i}.png").read_bytes()


def test_a1111_img2img_and_listing_routes(server):
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    b64 = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    status, _, r = server.call(
        "/sdapi/v1/img2img", {"init_images": [b64], "prompt": "x", "denoising_strength": 0.5, "steps": 4, "seed": 1}
    )
    assert status == 200, r
    assert Image.open(io.BytesIO(_png(r["images"][0]))).size == (64, 80)
    assert json.loads(r["info"])["denoising_strength"] == 0.5
    assert [m["title"] for m in server.call("/sdapi/v1/sd-models")[2]] == ["tiny"]
    names = {s["name"] for s in server.call("/sdapi/v1/samplers")[2]}
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM", "LCM"} <= names
    assert server.call("/sdapi/v1/options")[2]["sd_model_checkpoint"] == "tiny"
    assert server.call("/sdapi/v1/options", {"sd_model_checkpoint": "nope"})[0] == 404
    assert server.call("/v1/models")[2]["data"][0]["id"] == "tiny"


def test_progress_preview_and_interrupt(server):
    body = {"prompt": "slow", "steps": 120, "width": 256, "height": 256, "seed": 3, "force_task_id": "task-1"}
    answer = {}
    t = threading.Thread(target=lambda: answer.update(r=server.call("/sdapi/v1/txt2img", body)))
    t.start()
    deadline = time.monotonic() + 120
    while True:
        p = server.call("/sdapi/v1/progress?id_task=task-1")[2]
        if p["state"]["sampling_step"] >= 2 and p["current_image"]:
            break
        assert time.monotonic() < deadline, p
        time.sleep(0.1)
    assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["state"]["job"] == "txt2img"
    assert Image.open(io.BytesIO(_png(p["current_image"]))).size == (32, 32)  # the latent-size approximation
    assert (
        server.call(
            "/sdapi/v1/interrupt",
            {},
        )[0]
        == 200
    )
    t.join(120)
    status, _, r = answer["r"]
    info = json.loads(r["info"])
    assert status == 200 and info["interrupted"] is True
    assert info["sdxl_openvino"][0]["interrupted_at_step"] < 120
    assert Image.open(io.BytesIO(_png(r["images"][0]))).size == (256, 256)
    assert server.call("/sdapi/v1/progress")[2]["state"]["job_count"] == 0


def test_disconnect_cancels_the_running_job(server):
    before = server.metric("sdxl_step_seconds_count", model="tiny")
    body = json.dumps({"prompt": "slow", "steps": 150, "width": 256, "height": 256, "force_task_id": "gone"}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    deadline = time.monotonic() + 120
    while server.call("/sdapi/v1/progress?id_task=gone")[2]["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    sock.close()
    while server.metric("sdxl_requests_total", route="/sdapi/v1/txt2img", outcome="disconnected") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    while server.call("/sdapi/v1/progress")[2]["state"]["job_count"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert server.metric("sdxl_step_seconds_count", model="tiny") - before < 150  # stopped, not run to the end


def _b64_png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BAD = [  # (route, body, status, words in the reason)
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 63, "height": 64}, 400, "multiple of 8"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 1024, "height": 64}, 400, "--max-size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, 400, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 100000}, 400, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 2}, 400, "--max-n"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Heun++"}, 400, "unknown sampler"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "other"}}, 404, "unknown model"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, 400, "hires fix"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed": "abc"}, 400, "seed"),
    ("/sdapi/v1/txt2img", {"prompt": 5}, 400, "prompt"),
    ("/sdapi/v1/txt2img", [1, 2], 400, "JSON object"),
    ("/sdapi/v1/img2img", {"init_images": ["bm90IGFuIGltYWdl"], "prompt": "x"}, 400, "not a readable image"),
    ("/sdapi/v1/img2img", {"init_images": ["%%%"], "prompt": "x"}, 400, "base64"),
    ("/sdapi/v1/img2img", {"init_images": [_b64_png(32, 32)], "prompt": "x"}, 400, "outside"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, 400, "init_images"),
    ("/v1/images/generations", {"prompt": ""}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "n": 9}, 400, "n must be"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "WIDTHxHEIGHT"),
    ("/v1/images/generations", {"prompt": "x", "rng_seed": -5}, 400, "rng_seed"),
    ("/v1/images/generations", {"prompt": "x", "guidance_scale": "nan"}, 400, "guidance_scale"),
]


@pytest.mark.parametrize("route,body,status,words", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_a_4xx_with_a_reason(server, route, body, status, words):
    got, _, r = server.call(route, body)
    assert got == status, r
    reason = r["error"]["message"] if route.startswith("/v1/") else r["detail"]
    assert words in reason and "\n" not in reason and "Traceback" not in reason


def test_transport_errors_and_the_server_keeps_serving(server):
    status, _, r = server.call("/sdapi/v1/txt2img", raw=b"{not json")
    assert status == 400 and "JSON" in r["detail"]
    big = b"{" + b" " * (33 * 2**20) + b"}"
    try:
        status, _, r = server.call("/sdapi/v1/txt2img", raw=big)
        assert status == 413 and "--max-body-mb" in r["detail"]
    except (ConnectionError, OSError):  # the server may answer 413 and close before the body is sent
        pass
    assert server.call("/v1/images/edits", {"prompt": "x"})[0] == 415
    assert server.call("/nope")[0] == 404 and server.call("/sdapi/v1/txt2img")[0] == 405
    assert server.call("/health")[2] == {"status": "ok"} and server.call("/ready")[0] == 200
    assert server.call("/sdapi/v1/txt2img", {"prompt": "still here", "width": 64, "height": 64, "steps": 1})[0] == 200
    nulls = {
        "prompt": "x",
        "width": 64,
        "height": 64,
        "steps": 1,
        "batch_size": None,
        "n_iter": None,
        "cfg_scale": None,
    }
    assert server.call("/sdapi/v1/txt2img", nulls)[0] == 200  # JSON null = not set: the default


def test_metrics_in_prometheus_text(server):
    text = server.call("/metrics")[2]
    assert "# TYPE sdxl_requests_total counter" in text and 'sdxl_queue_depth{model="tiny"} 0' in text
    assert server.metric("sdxl_requests_total", route="/sdapi/v1/txt2img", outcome="rejected") >= 1
    assert server.metric("sdxl_image_seconds_count", model="tiny") >= 1
    assert server.metric("sdxl_step_seconds_sum", model="tiny") > 0


def test_inpainting_on_both_apis(client, server, model_dir, tmp_path):
    from runtime.pipeline import SDXLPipeline

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    square = np.zeros((64, 64), np.uint8)
    square[16:40, 24:48] = 255  # white = repaint
    mask = Image.fromarray(square, "L")
    rgba = np.full((64, 64, 4), 255, np.uint8)
    rgba[..., 3] = 255 - square  # OpenAI's mask: transparent = repaint
    paths = {}
    for name, im in (("image", image), ("mask", Image.fromarray(rgba, "RGBA"))):
        paths[name] = tmp_path / f"{name}.png"
        im.save(paths[name])
    with open(paths["image"], "rb") as f, open(paths["mask"], "rb") as m:
        r = client.images.edit(model="tiny", image=f, mask=m, prompt="a window",
                               extra_body={"strength": 0.8, "num_inference_steps": 3, "rng_seed": 4})  # fmt: skip
    pipe = SDXLPipeline(model_dir)
    kw = dict(
        prompt="a window",
        image=image,
        mask_image=mask,
        strength=0.8,
        num_inference_steps=3,
        seed=4,
        height=64,
        width=64,
    )
    want = pipe(**kw).images[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(_png(r.data[0].b64_json)))), want)
    body = {"init_images": [_b64(image)], "mask": _b64(mask), "prompt": "a window", "denoising_strength": 0.8,
            "steps": 3, "seed": 4, "mask_blur": 2, "inpaint_full_res": True, "inpaint_full_res_padding": 8,
            "inpainting_fill": 1}  # fmt: skip
    status, _, a = server.call("/sdapi/v1/img2img", body)
    assert status == 200, a
    want = pipe(**kw, mask_blur=2, padding_mask_crop=8).images[0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(_png(a["images"][0])))), want)
    status, _, a = server.call("/sdapi/v1/img2img", dict(body, inpainting_fill=0))
    assert status == 400 and "inpainting_fill" in a["detail"]


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_loras_by_name_from_lora_dir(model_dir, tmp_path):
    """A1111's <lora:NAME:WEIGHT> and the OpenAI route's `loras` resolve NAME in --lora-dir: the CLI's --lora image."""
    from tests.test_lora import _fresh_pipe, _random_lora, _save_peft

    loras = tmp_path / "loras"
    loras.mkdir()
    ref = _fresh_pipe("base")
    _save_peft(_random_lora(ref, ("unet", "text_encoder", "text_encoder_2"), seed=21), loras / "ink.safetensors")
    server = LiveServer("--model", f"tiny={model_dir}", "--lora-dir", loras)
    try:
        assert [x["name"] for x in server.call("/sdapi/v1/loras")[2]] == ["ink"]
        body = {"prompt": "a cat <lora:ink:0.8>", "seed": 3, "steps": 2, "width": 64, "height": 64}
        status, _, r = server.call("/sdapi/v1/txt2img", body)
        assert status == 200, r
        plain = server.call("/sdapi/v1/txt2img", dict(body, prompt="a cat"))[2]
        body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, "rng_seed": 3, "loras": {"ink": 0.8}}
        o = server.call("/v1/images/generations", body)[2]
        assert server.call("/sdapi/v1/txt2img", {"prompt": "x <lora:../ink:1>"})[0] == 400
        status, _, e = server.call("/v1/images/generations", dict(body, loras={"nope": 1}))
        assert status == 400 and "unknown LoRA 'nope'" in e["error"]["message"]
    finally:
        assert "Traceback" not in server.stop()
    out = tmp_path / "cli.png"
    lora = ["--lora", f"{loras / 'ink.safetensors'}:0.8"]
    proc = cli.run("runtime.generate", "--model", model_dir, "--prompt", "a cat", *lora, "--seed", 3, "--steps", 2,
                   "--height", 64, "--width", 64, "--output", out, "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    want = np.asarray(Image.open(out))
    png = Image.open(io.BytesIO(_png(r["images"][0])))
    assert np.array_equal(np.asarray(png), want) and "<lora:ink:0.8>" in png.info["parameters"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(_png(o["data"][0]["b64_json"])))), want)
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(_png(plain["images"][0])))), want)  # after: none
