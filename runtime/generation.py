"""One generation: parameters checked up front, prompt conditioning set once, a loop that yields each step.

Text-to-image when `image` is None, image-to-image (SDEdit, or the refiner's half of the base -> refiner
hand-off with `denoising_start`) otherwise. `Refinement` chains a base generation and a refiner generation;
`PerImage` (runtime.per_image) runs a batch as single-image generations, seeds seed, seed + 1, ...
Each reports its stages ("encode", "compile", "denoise", "decode") to `on_stage(name)` when one is set.
# ref: diffusers StableDiffusionXLPipeline.__call__, StableDiffusionXLImg2ImgPipeline.__call__ (v0.42)
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime import conditioning
from runtime.denoise import DeepCache, UNetDenoiser
from runtime.errors import RuntimeInputError
from runtime.image import load_image, png_text, sampler_name, save_png
from runtime.inpaint import Inpainting
from runtime.params import GenerationParams
from runtime.rng import TorchGenerator
from runtime.text import encode_prompt
from runtime.vae import Previewer
from schedulers import StepState, create_scheduler

if TYPE_CHECKING:
    from runtime.pipeline import SDXLPipeline

__all__ = ["Generation", "GenerationResult", "Refinement", "StepState"]

StageCallback = Callable[[str], None]


@dataclass
class GenerationResult:
    latents: np.ndarray  # [N, 4, h, w] final latents (not divided by the VAE scaling factor)
    images: np.ndarray | None  # [N, H, W, 3] uint8, None for output_type="latent"
    parameters: dict = field(default_factory=dict)  # the whole call's, with the real size, model and sampler
    # image i's own parameters: what makes it again alone (its seed; batch_size/batch_pos in batch seed mode)
    image_parameters: list[dict] = field(default_factory=list)

    def pil(self) -> list:
        """PIL images carrying their parameters as PNG text (`image.info["parameters"]`, A1111's format, and
        `image.info["sdxl-openvino"]`, JSON); `save(path, i)` or runtime.image.png_info writes them to a file."""
        from PIL import Image

        images = [Image.fromarray(im) for im in self.images]
        for im, params in zip(images, self.image_parameters, strict=False):
            im.info.update(png_text(params))
        return images

    def save(self, path: str | Path, index: int = 0) -> None:
        """Write image `index` as a PNG with its parameters (atomically, via a temporary name)."""
        params = self.image_parameters[index] if index < len(self.image_parameters) else self.parameters
        save_png(self.images[index], Path(path), params)


def _recorded(pipe: SDXLPipeline, params: GenerationParams, latents: np.ndarray, refiner=None) -> GenerationResult:
    """The parameters a result records: the call's (real size, model folders, A1111 sampler name, the input
    image's path) and each image's (batch seed mode: batch_size and batch_pos)."""
    f = pipe.info.vae_scale_factor
    rec = params.public()
    rec.update(height=int(latents.shape[2] * f), width=int(latents.shape[3] * f), model=str(pipe.dir))
    rec["sampler"] = sampler_name(pipe.info.scheduler_config, params.scheduler)
    if refiner is not None:
        rec["refiner"] = str(refiner.dir)
    if params.image is not None:
        rec["image"] = str(params.image) if isinstance(params.image, (str, Path)) else "<in-memory image>"
    else:
        rec.pop("strength", None)  # text-to-image: no strength was used
    if params.mask_image is not None:
        mask = params.mask_image
        rec["mask_image"] = str(mask) if isinstance(mask, (str, Path)) else "<in-memory image>"
    rec.update(device=pipe.device, precision=pipe.precision)
    if getattr(pipe, "lora_record", None) and pipe.lora_record():  # the LoRA adapters in force (runtime.lora_api)
        rec["loras"] = pipe.lora_record()
    n = len(latents)
    images = [rec] if n == 1 else [dict(rec, batch_size=n, batch_pos=i) for i in range(n)]
    return GenerationResult(latents, None, rec, images)


class Generation:
    """Iterate for StepState per denoising step; `result()` finishes the loop and decodes.

    handoff: the refiner's half of a base -> refiner chain, whose image (the base's latents) arrives through
    `start_from` before the loop runs; its schedule is checked now, before the base does any work."""

    def __init__(self, pipe: SDXLPipeline, params: GenerationParams, handoff: bool = False):
        info = pipe.info
        self.pipe, self.info = pipe, info
        if params.seed is None:
            params = params.replace(seed=secrets.randbelow(2**63))
        self.params = p = params
        self.img2img = p.image is not None or handoff
        self.inpaint = Inpainting(info, p, handoff) if p.mask_image is not None else None  # runtime.inpaint
        if self.inpaint is None and info.is_inpainting:
            raise RuntimeInputError(f"{info.dir} has an inpainting UNet ({info.in_channels} input channels): "
                                    "pass an image and a mask_image")  # fmt: skip
        if info.is_refiner and not self.img2img:
            raise RuntimeInputError(f"{info.dir} is a refiner: it cannot do text-to-image without an image")
        try:
            self.scheduler = create_scheduler(info.scheduler_config, p.scheduler)
            cut = dict(strength=p.strength, denoising_start=p.denoising_start) if self.img2img else {}
            self.plan = self.scheduler.plan(p.num_inference_steps, denoising_end=p.denoising_end, **cut)
        except ValueError as e:
            raise RuntimeInputError(str(e)) from None
        self.batch = p.batch
        self._image = None
        if p.image is not None and self.inpaint is None:
            try:
                self._image = load_image(p.image, info.vae_scale_factor, info.in_channels)
            except ValueError as e:
                raise RuntimeInputError(str(e)) from None
        self._latents: np.ndarray | None = None
        self._iter: Iterator | None = None
        self.on_stage: StageCallback | None = None
        self.previewer = Previewer(p.preview, p.preview_every, pipe.tiny_vae)

    def preview(self, state: StepState) -> np.ndarray | None:
        """The preview image [N, H, W, 3] uint8 of a step this generation yielded (params preview, preview_every:
        "approx" at the latent size, "tiny" at the image size), None when off or not one of its steps; made when
        asked, so previews cost nothing unless called."""
        return self.previewer(state)

    def _stage(self, name: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name)

    @property
    def do_cfg(self) -> bool:
        return self.params.guidance_scale > 1 and self.info.time_cond_proj_dim is None

    @property
    def total(self) -> int:
        return len(self.plan.timesteps)

    def start_from(self, latents: np.ndarray) -> None:
        """The image of a hand-off generation: the base's final latents."""
        self._image = np.asarray(latents, np.float32)
        if self.inpaint is not None:
            self.inpaint.start_from(self._image)

    # -- conditioning that does not change during the loop -----------------------------------------------
    def _time_ids(self, height: int, width: int) -> np.ndarray:
        p, batch = self.params, self.batch
        size = (height, width)
        original, target = p.original_size or size, p.target_size or size
        if not self.img2img:  # ref: StableDiffusionXLPipeline.__call__: [neg, pos] pair repeated per image
            positive = conditioning.base_time_ids(original, p.crops_coords_top_left, target)
            negative = positive
            if p.negative_original_size is not None and p.negative_target_size is not None:
                negative = conditioning.base_time_ids(
                    p.negative_original_size, p.negative_crops_coords_top_left, p.negative_target_size
                )
            return conditioning.cfg_time_ids(negative, positive, batch, self.do_cfg)
        # ref: StableDiffusionXLImg2ImgPipeline.__call__ / _get_add_time_ids: all negatives, then all positives
        neg_original = p.negative_original_size or original
        neg_target = p.negative_target_size or target
        if self.info.requires_aesthetics_score:
            positive = conditioning.refiner_time_ids(original, p.crops_coords_top_left, p.aesthetic_score)
            negative = conditioning.refiner_time_ids(
                neg_original, p.negative_crops_coords_top_left, p.negative_aesthetic_score
            )
        else:  # diffusers takes the positive crop for the negative here
            positive = conditioning.base_time_ids(original, p.crops_coords_top_left, target)
            negative = conditioning.base_time_ids(neg_original, p.crops_coords_top_left, neg_target)
        rows = [np.tile(negative, (batch, 1))] if self.do_cfg else []
        return np.concatenate([*rows, np.tile(positive, (batch, 1))])  # [2B, n] or [B, n]

    def _conditioning(self, height: int, width: int) -> dict[str, np.ndarray]:
        p, info = self.params, self.info
        try:
            emb = encode_prompt(
                self.pipe.text_encoders, p.prompt, p.prompt_2, p.negative_prompt, p.negative_prompt_2,
                p.num_images_per_prompt, self.do_cfg, info.force_zeros_for_empty_prompt, p.clip_skip,
                prompt_syntax=p.prompt_syntax,
            )  # fmt: skip
        except ValueError as e:
            raise RuntimeInputError(str(e)) from None
        if self.do_cfg:
            embeds = np.concatenate([emb.negative_embeds, emb.embeds])  # [2B, 77, 2048]
            pooled = np.concatenate([emb.negative_pooled, emb.pooled])  # [2B, 1280]
        else:
            embeds, pooled = emb.embeds, emb.pooled
        inputs = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": self._time_ids(height, width)}
        if info.time_cond_proj_dim:
            w = conditioning.guidance_embedding(p.guidance_scale - 1, self.batch, info.time_cond_proj_dim)
            inputs["timestep_cond"] = w  # [B, d]
        return inputs

    # -- initial latents ---------------------------------------------------------------------------------
    def _text2img_latents(self, generator: TorchGenerator) -> np.ndarray:
        p, info, f = self.params, self.info, self.info.vae_scale_factor
        height, width = p.height or info.default_size, p.width or info.default_size
        shape = (self.batch, info.in_channels, height // f, width // f)
        if p.latents is not None:
            latents = np.asarray(p.latents, dtype=np.float32)
            if latents.shape != shape:
                raise RuntimeInputError(f"latents have shape {list(latents.shape)}, expected {list(shape)}")
        else:
            latents = generator.randn(shape)
        return (latents * np.float32(self.plan.init_noise_sigma)).astype(np.float32)

    def _img2img_latents(self, generator: TorchGenerator) -> np.ndarray:
        """# ref: diffusers StableDiffusionXLImg2ImgPipeline.prepare_latents"""
        p, image = self.params, self._image
        if p.latents is not None:
            return np.asarray(p.latents, dtype=np.float32)
        if image is None:
            raise RuntimeInputError("a hand-off generation needs the base's latents (start_from) before it runs")
        if image.shape[1] == self.info.in_channels:  # latents given as the image: no encode, no scaling
            init = image
        else:
            init = self.pipe.encode_image(image, generator, p.vae_tiling, p.vae_tile_size, p.vae_decoder)  # scaled
        if self.batch % init.shape[0]:
            raise RuntimeInputError(f"cannot spread {init.shape[0]} images over {self.batch} generations")
        init = np.concatenate([init] * (self.batch // init.shape[0]))
        if p.denoising_start is not None:  # the refiner continues the base's latents: no new noise
            return init.astype(np.float32)
        return self.plan.add_noise(init, generator.randn(init.shape)).astype(np.float32)

    # -- the loop ----------------------------------------------------------------------------------------
    def _steps(self) -> Iterator[StepState]:
        generator = TorchGenerator(self.params.seed)
        self._stage("encode")
        if self.inpaint is not None:
            latents = self.inpaint.prepare(self, generator)
        else:
            latents = self._img2img_latents(generator) if self.img2img else self._text2img_latents(generator)
        f = self.info.vae_scale_factor
        inputs = self._conditioning(latents.shape[2] * f, latents.shape[3] * f)
        # low memory: each model is compiled when its stage starts and released when it ends; otherwise each
        # keeps its weights and compiled graph, and only its activation buffers are freed between stages
        for enc in self.pipe.text_encoders:
            self.pipe.done_with(enc.encoder)
        p = self.params
        self._stage("compile")
        dc = DeepCache(p.deepcache_interval, p.deepcache_branch, p.deepcache_schedule, p.deepcache_center,
                       p.deepcache_pow)  # fmt: skip
        shape = latents.shape if self.inpaint is None else self.inpaint.sample_shape(latents.shape)
        self.denoiser = denoiser = UNetDenoiser(self.pipe.unet, inputs, shape, p.guidance_scale,
                                                p.guidance_rescale, self.do_cfg, self.pipe.unet_observers,
                                                timesteps=self.plan.timesteps, deepcache=dc,
                                                guidance_cutoff=p.guidance_cutoff,
                                                low_memory=self.pipe.low_memory)  # fmt: skip
        self._stage("denoise")
        try:
            model = denoiser if self.inpaint is None else self.inpaint.model(denoiser)
            for state in self.plan.sample(latents, model, generator.randn):
                if self.inpaint is not None:
                    self.inpaint.blend(state)  # in place: the sampler carries on from the blended latents
                latents = state.latents
                if not np.isfinite(latents).all():  # checked each step: NaN never heals, stop at the first
                    raise RuntimeInputError(
                        f"the denoising produced non-finite latents (NaN/inf) at step {state.index + 1} of "
                        f"{state.total} (NaN/inf in the model's weights or the inputs, or an overflow)"
                    )
                yield state
        finally:
            denoiser.close()
        self._latents = latents
        self.pipe.done_with(self.pipe.unet)

    def __iter__(self) -> Iterator[StepState]:
        if self._iter is None:
            self._iter = self._steps()
        return self._iter

    def result(self) -> GenerationResult:
        for _ in self:  # run what is left of the loop
            pass
        result, p = _recorded(self.pipe, self.params, self._latents), self.params
        if p.output_type != "latent":
            self._stage("decode")
            shape = result.latents.shape
            tiles = None if p.vae_decoder == "tiny" else self.pipe.vae_tiles(shape, p.vae_tiling, p.vae_tile_size)
            result.images = self.pipe.decode(result.latents, p.vae_decoder, tiles)
            if self.inpaint is not None:  # padding_mask_crop: pasted back into the original
                result.images = self.inpaint.finish(result.images)
            for rec in (result.parameters, *result.image_parameters):  # what was run, "auto" resolved
                rec.update(vae_tiling="on" if tiles else "off", vae_tile_size=tiles.sample if tiles else None)
        return result


class Refinement:
    """The base -> refiner chain as one generation: the base's steps, then the refiner's, numbered as one run.

    high_noise_frac f: ensemble of experts (the base stops at denoising_end=f and hands its latents over
    undecoded, the refiner starts at denoising_start=f); otherwise SDEdit refinement of the base's final latents
    at refiner_strength (0.3 by default). Both schedules are checked before any work."""

    def __init__(self, base: SDXLPipeline, refiner: SDXLPipeline, params: GenerationParams):
        inpaint = params.mask_image is not None  # ensemble only: the refiner inpaints the base's latents
        if inpaint and (params.high_noise_frac is None or params.padding_mask_crop is not None):
            raise RuntimeInputError("inpainting with a refiner needs high_noise_frac and no padding_mask_crop")
        if params.image is not None and not inpaint:
            raise RuntimeInputError("image-to-image with a refiner is not supported; run img2img on either folder")
        if params.seed is None:
            params = params.replace(seed=secrets.randbelow(2**63))
        frac = params.high_noise_frac
        strength = 0.3 if params.refiner_strength is None else params.refiner_strength
        self.params = params.replace(refiner_strength=None if frac is not None else strength)
        chain = dict(high_noise_frac=None, refiner_strength=None)
        first = dataclasses.replace(params, **chain, denoising_end=frac, output_type="latent")
        # the refiner's size is its image's (the base's latents)
        second = dataclasses.replace(params, **chain, latents=None, height=None, width=None, denoising_end=None,
                                     image=None)  # fmt: skip
        if frac is not None:
            second = dataclasses.replace(second, denoising_start=frac)
        else:
            second = dataclasses.replace(second, strength=strength)
        self.base, self.refiner = base.generation(first), refiner.generation(second, handoff=True)
        self._pipes = (base, refiner)
        self._iter: Iterator | None = None

    @property
    def on_stage(self) -> StageCallback | None:
        return self.base.on_stage

    @on_stage.setter
    def on_stage(self, callback: StageCallback | None) -> None:
        self.base.on_stage = self.refiner.on_stage = callback

    @property
    def total(self) -> int:
        return self.base.total + self.refiner.total

    def preview(self, state: StepState) -> np.ndarray | None:
        """Generation.preview, for the base's steps and the refiner's (one latent space)."""
        return self.base.preview(state)

    def _steps(self) -> Iterator[StepState]:
        total, n = self.total, self.base.total
        for state in self.base:
            yield dataclasses.replace(state, total=total)
        latents = self.base.result().latents
        if self._pipes[0].low_memory:
            self._pipes[0].release()
        self.refiner.start_from(latents)
        for state in self.refiner:
            yield dataclasses.replace(state, index=state.index + n, total=total)

    def __iter__(self) -> Iterator[StepState]:
        if self._iter is None:
            self._iter = self._steps()
        return self._iter

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        result = self.refiner.result()
        recorded = _recorded(self._pipes[0], self.params, result.latents, refiner=self._pipes[1])
        recorded.images = result.images
        for rec in (recorded.parameters, *recorded.image_parameters):  # the refiner's decode, "auto" resolved
            rec.update({k: result.parameters[k] for k in ("vae_tiling", "vae_tile_size") if k in result.parameters})
        return recorded
