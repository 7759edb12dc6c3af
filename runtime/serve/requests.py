"""Request bodies -> generation keywords, checked against the server's limits; ApiError carries a 4xx and its
one-line reason to the route, which answers in its API's error shape."""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from runtime.image import A1111_SAMPLERS


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


@dataclass(frozen=True)
class Limits:
    max_size: int = 2048  # pixels, each side
    max_steps: int = 150
    max_n: int = 8  # images per request
    max_body_mb: float = 32.0
    timeout: float = 600.0  # seconds a request may wait and run
    queue_size: int = 8  # jobs waiting per model


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param, "invalid_value" if param else "invalid_request")


def integer(body: dict, key: str, lo: int, hi: int, default: Any = None, alias: str | None = None) -> Any:
    name = alias or key
    v = body.get(key)
    if v is None:  # absent or null: the default (JSON clients send null for "not set")
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():  # multipart form fields arrive as text
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise bad(f"{name} must be an integer from {lo} to {hi}, got {v!r}", name)
    return v


def number(body: dict, key: str, lo: float, hi: float, default: Any = None, alias: str | None = None) -> Any:
    name = alias or key
    v = body.get(key)
    if v is None:  # absent or null: the default (JSON clients send null for "not set")
        return default
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise bad(f"{name} must be a number, got {v!r}", name) from None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
        raise bad(f"{name} must be a number from {lo:g} to {hi:g}, got {v!r}", name)
    return float(v)


def text(body: dict, key: str, required: bool = False, max_chars: int = 20000) -> str | None:
    v = body.get(key)
    if v is None or (v == "" and not required):
        if required:
            raise bad(f"{key} is required", key)
        return None
    if not isinstance(v, str):
        raise bad(f"{key} must be a string", key)
    if required and not v.strip():
        raise bad(f"{key} must not be empty", key)
    if len(v) > max_chars:
        raise bad(f"{key} is longer than {max_chars} characters", key)
    return v


def size(width: int | None, height: int | None, limits: Limits, param: str = "size") -> tuple[int | None, int | None]:
    for side, name in ((width, "width"), (height, "height")):
        if side is None:
            continue
        if side % 8:
            raise bad(f"{name} {side} is not a multiple of 8", param)
        if not 64 <= side <= limits.max_size:
            raise bad(f"{name} {side} is outside 64..{limits.max_size} (the server's --max-size)", param)
    return width, height


def openai_size(value: Any, limits: Limits) -> tuple[int | None, int | None]:
    """OpenAI's "WxH" (or "auto": the model's default size)."""
    if value is None or value == "auto":
        return None, None
    if not isinstance(value, str) or value.count("x") != 1:
        raise bad(f"size must be 'WIDTHxHEIGHT' or 'auto', got {value!r}", "size")
    w, h = value.split("x")
    if not (w.isdigit() and h.isdigit()):
        raise bad(f"size must be 'WIDTHxHEIGHT' or 'auto', got {value!r}", "size")
    return size(int(w), int(h), limits)


def seed(value: Any, param: str) -> int | None:
    """None or -1 (A1111's "random") -> None; else a 64-bit unsigned seed."""
    if value is None or value == -1 or value == "-1" or value == "":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise bad(f"{param} must be an integer from 0 to 2^64-1 (or -1 for a random seed), got {value!r}", param)
    return value


# A1111's sampler names (and our short names) -> ours; A1111's "scheduler" field picks the sigma schedule
_SAMPLERS = {v.lower(): k for k, v in A1111_SAMPLERS.items()} | {k: k for k in A1111_SAMPLERS}


def sampler(name: Any, schedule: Any = None, param: str = "sampler_name") -> str | None:
    if name in (None, ""):
        return None
    if not isinstance(name, str) or name.lower() not in _SAMPLERS:
        known = ", ".join(A1111_SAMPLERS.values())
        raise bad(f"unknown sampler {name!r}; this server has: {known}", param)
    ours = _SAMPLERS[name.lower()]
    if isinstance(schedule, str) and schedule.lower() == "karras":
        if f"{ours}_karras" not in A1111_SAMPLERS:
            raise bad(f"sampler {name!r} has no Karras schedule here", "scheduler")
        ours = f"{ours}_karras"
    elif schedule not in (None, "", "Automatic", "automatic"):
        raise bad(f"scheduler {schedule!r} is not supported (Automatic or Karras)", "scheduler")
    return ours


def decode_image(data: bytes | str, limits: Limits, param: str) -> Image.Image:
    """Bytes (multipart) or base64 text (JSON, with or without a data: URL prefix) -> an RGB PIL image within the
    size limit; anything else is a 400 naming the field."""
    if isinstance(data, str):
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{param} is not valid base64", param) from None
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise bad(f"{param} is empty", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if max(im.size) > limits.max_size * 4:
                raise bad(f"{param}: {im.size[0]}x{im.size[1]} is too large to read", param)
            im.load()
    except ApiError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad(f"{param} is not a readable image (PNG, JPEG, WebP, ...)", param) from None
    return im


def init_image(im: Image.Image, width: int | None, height: int | None, limits: Limits, param: str) -> Image.Image:
    """The image to start from: resized to width x height when both are given (A1111's "just resize"), else as
    sent (the library rounds its sides down to multiples of 8, as diffusers' image processor does: the same
    picture as the CLI given the same file)."""
    if width and height:
        im = im.convert("RGB").resize((width, height), resample=Image.LANCZOS)
    w, h = (x - x % 8 for x in im.size)
    if min(w, h) < 64 or max(w, h) > limits.max_size:
        raise bad(f"{param}: {im.size[0]}x{im.size[1]} is outside 64..{limits.max_size} pixels a side", param)
    return im


def openai_mask(im: Image.Image) -> Image.Image:
    """OpenAI's mask: its fully transparent pixels are where the image is edited. An image without alpha is read
    as diffusers reads a mask (white = repaint)."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")
    return im.convert("L")
