"""Memory: what this process may still allocate, the limit a generation is checked against, and a rough floor of
the activations a generation of a given size holds (to refuse sizes that cannot fit before any work)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import RuntimeInputError
from runtime.params import _is_int, _is_real

if TYPE_CHECKING:
    from runtime.params import ModelInfo

ENV_MAX_MEMORY_GB = "SDXL_OPENVINO_MAX_MEMORY_GB"


def available_memory() -> int | None:
    """Bytes this process can still allocate: /proc/meminfo's MemAvailable (else physical memory), lowered to
    what a cgroup v2 limit leaves; None where none of these can be read."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return avail


def memory_limit(max_memory_gb: float | None = None) -> float | None:
    """The memory a generation's estimate is checked against, in bytes: `max_memory_gb` (GiB) if given, else
    $SDXL_OPENVINO_MAX_MEMORY_GB, else available_memory(). "inf" switches the check off; None: unknown."""
    if max_memory_gb is None:
        env = os.environ.get(ENV_MAX_MEMORY_GB, "").strip()
        if env:
            try:
                max_memory_gb = float(env)
            except ValueError:
                raise RuntimeInputError(f"${ENV_MAX_MEMORY_GB}={env!r} must be a number of GiB (or inf)") from None
    if max_memory_gb is not None:
        if not _is_real(max_memory_gb) or math.isnan(max_memory_gb) or max_memory_gb <= 0:
            raise RuntimeInputError(f"max_memory_gb={max_memory_gb!r} must be a positive number of GiB (or inf)")
        return float(max_memory_gb) * 2**30
    return available_memory()


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def estimate(info: ModelInfo, height: int, width: int, batch: int = 1, cfg: bool = True) -> dict[str, int]:
    """Bytes of the largest activations a generation of height x width holds at once, by stage (f32, 4 bytes
    a value; the model weights are not counted). A rough floor to refuse sizes that cannot fit, not a promise
    that the others do:

    - latents: the UNet's input and output and the sampler's state, ~8 latent tensors of the UNet batch (2
      rows per image under classifier-free guidance);
    - vae_decoder: its largest feature map (one image per call: the runtime decodes images one at a time),
      3 times: a resnet's input, its normalised copy and its output. Each up block doubles the resolution at
      its end, so the full-resolution tensors have the channels of the last two decoder blocks: SDXL's VAE
      (block_out_channels 128, 256, 512, 512) holds 256 x H x W values there, 1 GiB at 1024x1024;
    - unet: the first level's feature maps (block_out_channels[0] channels at the latent size, 3 of them)
      plus the query, key, value and output of the first level with attention. Not its tokens^2 scores:
      OpenVINO's fused attention does not hold them (the tiny test model at 2048x2048 peaked at 0.93 GiB in
      all, where one head's scores alone would be 1 GiB).
    """
    f = info.vae_scale_factor
    h, w = max(height // f, 1), max(width // f, 1)
    rows = (2 if cfg else 1) * batch
    latents = 8 * rows * info.in_channels * h * w * 4
    chans = list(reversed(info.vae_config.get("block_out_channels", [128, 256, 512, 512])))
    largest = 0
    for k, c in enumerate(chans):  # resolution h * 2^k: the output of block k-1's upsampler, then block k
        largest = max(largest, max(c, chans[k - 1] if k else c) * (h << k) * (w << k))
    vae = 3 * largest * 4
    unet_blocks = info.unet_config.get("block_out_channels")
    first = unet_blocks[0] if isinstance(unet_blocks, list) and unet_blocks and _is_int(unet_blocks[0]) else 320
    unet = 3 * rows * first * h * w * 4
    types = info.unet_config.get("down_block_types")
    if isinstance(types, list):
        level = next((i for i, t in enumerate(types) if isinstance(t, str) and "Attn" in t), None)
        if level is not None:
            ok = isinstance(unet_blocks, list) and level < len(unet_blocks) and _is_int(unet_blocks[level])
            channels = unet_blocks[level] if ok else first
            unet += 4 * rows * channels * max(h >> level, 1) * max(w >> level, 1) * 4
    return {"latents": latents, "vae_decoder": vae, "unet": unet}


def check(info: ModelInfo, height: int, width: int, batch: int = 1, cfg: bool = True, limit: float | None = None):
    """Refuse (RuntimeInputError) a size whose estimate exceeds `limit` bytes (None: no check)."""
    if limit is None or math.isinf(limit):
        return
    parts = estimate(info, height, width, batch, cfg)
    total = sum(parts.values())
    if total > limit:
        stage = max(parts, key=parts.get)
        raise RuntimeInputError(
            f"{width}x{height} x{batch} needs an estimated {_size(total)} ({stage}: {_size(parts[stage])}), "
            f"more than the {_size(limit)} available; choose a "
            f"smaller size, or raise the limit (max_memory_gb, --max-memory-gb or ${ENV_MAX_MEMORY_GB})"
        )
