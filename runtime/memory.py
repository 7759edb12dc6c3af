"""Memory: what this process may still allocate, the limit a generation is checked against, and a rough floor of
the activations a generation of a given size holds (to refuse sizes that cannot fit before any work)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import RuntimeInputError
from runtime.model_info import read_json
from runtime.params import _is_int, _is_real

if TYPE_CHECKING:
    from runtime.params import ModelInfo
    from runtime.vae import Tiles

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


def tiling_budget(max_memory_gb: float | None = None) -> float | None:
    """The memory vae_tiling="auto" decides against (runtime.vae.choose_tiles): the generation's limit
    (memory_limit), so that what check() counts is what the decode does; what is available now when the limit is
    switched off ("inf")."""
    limit = memory_limit(max_memory_gb)
    return available_memory() if limit is not None and math.isinf(limit) else limit


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def estimate(info: ModelInfo, height: int, width: int, batch: int = 1, cfg: bool = True, vae_decoder: str = "full",
             tiles: Tiles | None = None) -> dict[str, int]:  # fmt: skip
    """Bytes of the largest activations a generation of height x width holds at once, by stage (f32, 4 bytes
    a value; the model weights are not counted). A rough floor to refuse sizes that cannot fit, not a promise
    that the others do:

    - latents: the UNet's input and output and the sampler's state, ~8 latent tensors of the UNet batch (2
      rows per image under classifier-free guidance);
    - vae_decoder: the decode that will run (vae_bytes): the full VAE untiled, on one tile of `tiles`, or the
      tiny decoder (vae_decoder="tiny");
    - unet: the first level's feature maps (block_out_channels[0] channels at the latent size, 3 of them)
      plus the query, key, value and output of the first level with attention. Not its tokens^2 scores:
      OpenVINO's fused attention does not hold them (the tiny test model at 2048x2048 peaked at 0.93 GiB in
      all, where one head's scores alone would be 1 GiB).
    """
    f = info.vae_scale_factor
    h, w = max(height // f, 1), max(width // f, 1)
    rows = (2 if cfg else 1) * batch
    latents = 8 * rows * info.in_channels * h * w * 4
    vae = vae_bytes(info, height, width, vae_decoder, tiles)
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


def _channels(value, default: list[int]) -> list[int]:
    ok = isinstance(value, list) and value and all(_is_int(c) and c > 0 for c in value)
    return list(value) if ok else default


def _decoder_maps(chans: list[int], h: int, w: int, up: int = 2) -> int:
    """Bytes of a decoder's largest feature map, 3 times (a residual block's input, an intermediate and its
    output), where block k (chans[k] channels) runs at (h, w) x up^k after block k-1's upsampler (chans[k-1])."""
    largest = 0
    for k, c in enumerate(chans):
        largest = max(largest, max(c, chans[k - 1] if k else c) * h * up**k * w * up**k)
    return 3 * largest * 4


def vae_bytes(info: ModelInfo, height: int, width: int, vae_decoder: str = "full", tiles: Tiles | None = None) -> int:
    """Bytes of activations the final decode of height x width holds at once (one image per call), a floor:

    - full, untiled: 3 x the largest feature map. Each up block doubles the resolution at its end, so the
      full-resolution tensors have the channels of the last two decoder blocks: SDXL's VAE (block_out_channels
      128, 256, 512, 512) holds 256 x H x W values there, 1 GiB at 1024x1024;
    - full, tiled (runtime.vae.tiled_decode): the same at one tile's size (the border tiles are smaller), plus
      the f32 RGB outputs of all the tiles, which are kept for the blend, and the blended image;
    - tiny (diffusers DecoderTiny, from vae_decoder_tiny/config.json, AutoencoderTiny's defaults without one):
      3 x its largest feature map the same way: its block k runs at the latent size x upsampling_scaling_factor^k
      on decoder_block_out_channels[k] (plain convolutions and ReLUs, no attention); TAESDXL's 64 channels at
      full resolution, 0.75 GiB at 1024x1024.
    """
    f = info.vae_scale_factor
    h, w = max(height // f, 1), max(width // f, 1)
    if vae_decoder == "tiny":
        path = info.dir / "vae_decoder_tiny" / "config.json"
        config = read_json(path) if path.is_file() else {}
        up = config.get("upsampling_scaling_factor", 2)
        up = up if _is_int(up) and up > 0 else 2
        return _decoder_maps(_channels(config.get("decoder_block_out_channels"), [64, 64, 64, 64]), h, w, up)
    chans = list(reversed(_channels(info.vae_config.get("block_out_channels"), [128, 256, 512, 512])))
    if tiles is None:
        return _decoder_maps(chans, h, w)
    from runtime.vae import OVERLAP

    th, tw = min(tiles.latent, h), min(tiles.latent, w)
    step = max(int(tiles.latent * (1 - OVERLAP)), 1)  # ref: runtime.vae.tiled_decode
    count = math.ceil(h / step) * math.ceil(w / step)
    outputs = 3 * (count * th * tw * f * f + height * width) * 4
    return _decoder_maps(chans, th, tw) + outputs


def check(info: ModelInfo, height: int, width: int, batch: int = 1, cfg: bool = True, limit: float | None = None,
          vae_decoder: str = "full", vae_tiling: str = "off", vae_tile_size: int | None = None):  # fmt: skip
    """Refuse (RuntimeInputError) a size whose estimate exceeds `limit` bytes (None: no check). The VAE term is
    the decode that will run: vae_decoder "tiny", or the full VAE tiled as runtime.vae.choose_tiles decides for
    vae_tiling (auto: against this limit, as the pipeline's decode does) and vae_tile_size."""
    if limit is None or math.isinf(limit):
        return
    tiles = None
    if vae_decoder != "tiny":
        from runtime.vae import choose_tiles

        tiles = choose_tiles(info, height, width, vae_tiling, vae_tile_size, available=limit)
        f = info.vae_scale_factor
        if tiles is not None and not tiles.tiles_decode((height // f, width // f)):
            tiles = None  # diffusers tiles only above the tile size
    parts = estimate(info, height, width, batch, cfg, vae_decoder, tiles)
    total = sum(parts.values())
    if total > limit:
        stage = max(parts, key=parts.get)
        largest, hint = parts[stage], ""
        if stage == "vae_decoder" and vae_decoder == "tiny":
            stage = "vae_decoder (tiny)"
        elif stage == "vae_decoder" and tiles is None:
            hint = ", tile the VAE (vae_tiling, --vae-tiling on)"
        raise RuntimeInputError(
            f"{width}x{height} x{batch} needs an estimated {_size(total)} ({stage}: {_size(largest)}), "
            f"more than the {_size(limit)} available; choose a smaller size{hint}, or raise the limit "
            f"(max_memory_gb, --max-memory-gb or ${ENV_MAX_MEMORY_GB})"
        )
