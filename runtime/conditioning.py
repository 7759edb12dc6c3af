"""Micro-conditioning time ids and the LCM guidance embedding, as diffusers' SDXL pipelines build them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def base_time_ids(original_size: Sequence[int], crops_coords_top_left: Sequence[int], target_size: Sequence[int]):
    """[6]: height first, as diffusers. # ref: diffusers StableDiffusionXLPipeline._get_add_time_ids"""
    return np.array([*original_size, *crops_coords_top_left, *target_size], dtype=np.float32)


def refiner_time_ids(original_size: Sequence[int], crops_coords_top_left: Sequence[int], aesthetic_score: float):
    """[5]. # ref: diffusers StableDiffusionXLImg2ImgPipeline._get_add_time_ids (requires_aesthetics_score)"""
    return np.array([*original_size, *crops_coords_top_left, aesthetic_score], dtype=np.float32)


def cfg_time_ids(negative: np.ndarray, positive: np.ndarray, batch: int, do_cfg: bool) -> np.ndarray:
    """The UNet's time_ids for `batch` images. With guidance diffusers concatenates [negative, positive] and
    then repeats that pair `batch` times, so rows alternate negative/positive (which matters only when the
    negative micro-conditioning differs and batch > 1); we keep diffusers' layout so pictures match.
    # ref: diffusers StableDiffusionXLPipeline.__call__ (add_time_ids.repeat)"""
    rows = np.stack([negative, positive]) if do_cfg else positive[None]  # [2, n] or [1, n]
    return np.tile(rows, (batch, 1))  # [2B, n] or [B, n]


def guidance_embedding(w: float, batch: int, dim: int) -> np.ndarray:
    """LCM's w-embedding of (guidance_scale - 1), [batch, dim] float32.
    # ref: diffusers LatentConsistencyModelPipeline.get_guidance_scale_embedding"""
    w_t = np.full(batch, np.float32(w) * np.float32(1000.0), dtype=np.float32)  # [B]
    half = dim // 2
    scale = np.log(np.float32(10000.0)) / np.float32(half - 1)  # float32 throughout, as torch computes it
    # exp rounded from float64: torch's float32 exp agrees with that on all but ~1 % of elements (numpy's
    # float32 exp differs on half of them), and w * 1000 scales each 1-ulp difference into the sine's argument
    freqs = np.exp((np.arange(half, dtype=np.float32) * -scale).astype(np.float64)).astype(np.float32)  # [half]
    emb = w_t[:, None] * freqs[None, :]  # [B, half]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def rescale_guidance(guided: np.ndarray, text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """Rescale guided noise to the std of the text branch (arXiv 2305.08891 sec. 3.4).
    # ref: diffusers rescale_noise_cfg"""
    axes = tuple(range(1, guided.ndim))
    std_text = text.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = guided.std(axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_text / std_cfg)
    return (guidance_rescale * rescaled + (1 - guidance_rescale) * guided).astype(np.float32)
