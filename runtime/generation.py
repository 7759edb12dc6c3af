"""One generation: parameters checked up front, prompt conditioning set once, a loop that yields each step.

Text-to-image when `image` is None, image-to-image (SDEdit, or the refiner's half of the base -> refiner
hand-off with `denoising_start`) otherwise.
# ref: diffusers StableDiffusionXLPipeline.__call__, StableDiffusionXLImg2ImgPipeline.__call__ (v0.42)
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import openvino as ov

from runtime import conditioning
from runtime.errors import RuntimeInputError
from runtime.image import load_image
from runtime.rng import TorchGenerator
from runtime.text import encode_prompt
from schedulers import create_scheduler

if TYPE_CHECKING:
    from runtime.pipeline import SDXLPipeline

DEFAULTS = dict(
    prompt=None, prompt_2=None, negative_prompt=None, negative_prompt_2=None, height=None, width=None,
    num_inference_steps=50, guidance_scale=5.0, guidance_rescale=0.0, num_images_per_prompt=1, seed=None,
    latents=None, clip_skip=None, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
    negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
    output_type="np", scheduler=None, denoising_end=None,
    # image-to-image
    image=None, strength=0.3, denoising_start=None, aesthetic_score=6.0, negative_aesthetic_score=2.5,
)  # fmt: skip
OUTPUT_TYPES = ("np", "pil", "latent")


@dataclass
class StepState:
    index: int  # 0-based step
    total: int
    timestep: float
    latents: np.ndarray  # after this step
    denoised: np.ndarray | None  # the predicted clean latents, when the scheduler has them


@dataclass
class GenerationResult:
    latents: np.ndarray  # [N, 4, h, w] final latents (not divided by the VAE scaling factor)
    images: np.ndarray | None  # [N, H, W, 3] uint8, None for output_type="latent"
    parameters: dict = field(default_factory=dict)

    def pil(self) -> list:
        from PIL import Image

        return [Image.fromarray(im) for im in self.images]


def _fraction(value, name: str) -> float | None:
    if value is None:
        return None
    if not 0.0 < float(value) < 1.0:
        raise RuntimeInputError(f"{name}={value} must be between 0 and 1 (exclusive)")
    return float(value)


class Generation:
    """Iterate for StepState per denoising step; `result()` finishes the loop and decodes."""

    def __init__(self, pipe: SDXLPipeline, kwargs: dict):
        unknown = sorted(set(kwargs) - set(DEFAULTS))
        if unknown:
            raise TypeError(f"unknown parameter(s): {', '.join(unknown)}")
        self.pipe = pipe
        self.p = p = {**DEFAULTS, **kwargs}
        self.img2img = p["image"] is not None
        if pipe.is_refiner and not self.img2img:
            raise RuntimeInputError(f"{pipe.dir} is a refiner: it cannot do text-to-image without an image")
        if p["prompt"] is None or (not isinstance(p["prompt"], str) and not p["prompt"]):
            raise RuntimeInputError("prompt is required (a string or a non-empty list of strings)")
        for k in ("height", "width"):
            if p[k] is not None and (int(p[k]) <= 0 or int(p[k]) % 8):
                raise RuntimeInputError(f"{k}={p[k]} must be a positive multiple of 8")
        for k in ("num_inference_steps", "num_images_per_prompt"):
            if int(p[k]) < 1:
                raise RuntimeInputError(f"{k}={p[k]} must be at least 1")
        if p["guidance_scale"] < 0:
            raise RuntimeInputError(f"guidance_scale={p['guidance_scale']} must not be negative")
        if p["output_type"] not in OUTPUT_TYPES:
            raise RuntimeInputError(f"output_type={p['output_type']!r}: choose one of {', '.join(OUTPUT_TYPES)}")
        if p["clip_skip"] is not None and int(p["clip_skip"]) < 0:
            raise RuntimeInputError(f"clip_skip={p['clip_skip']} must not be negative")
        if not 0.0 <= float(p["strength"]) <= 1.0:
            raise RuntimeInputError(f"strength={p['strength']} must be in [0, 1]")
        start = _fraction(p["denoising_start"], "denoising_start") if self.img2img else None
        end = _fraction(p["denoising_end"], "denoising_end")
        if p["seed"] is None:
            p["seed"] = secrets.randbelow(2**63)
        try:
            self.scheduler = create_scheduler(pipe.scheduler_config, p["scheduler"])
            steps = int(p["num_inference_steps"])
            if self.img2img:
                self.plan = self.scheduler.plan(steps, strength=float(p["strength"]), denoising_start=start,
                                                denoising_end=end)  # fmt: skip
            else:
                self.plan = self.scheduler.plan(steps, denoising_end=end)
        except ValueError as e:
            raise RuntimeInputError(str(e)) from None
        if len(self.plan.timesteps) == 0:
            raise RuntimeInputError(
                f"no denoising step is left (num_inference_steps={steps}, strength={p['strength']}, "
                f"denoising_start={start}, denoising_end={end})"
            )
        self.batch = (1 if isinstance(p["prompt"], str) else len(p["prompt"])) * int(p["num_images_per_prompt"])
        self._image = None
        if self.img2img:
            try:
                self._image = load_image(p["image"], pipe.vae_scale_factor)
            except ValueError as e:
                raise RuntimeInputError(str(e)) from None
        self._latents: np.ndarray | None = None
        self._iter: Iterator | None = None

    @property
    def do_cfg(self) -> bool:
        return self.p["guidance_scale"] > 1 and self.pipe.time_cond_proj_dim is None

    # -- conditioning that does not change during the loop -----------------------------------------------
    def _time_ids(self, height: int, width: int) -> np.ndarray:
        p, batch = self.p, self.batch
        size = (height, width)
        original, target = p["original_size"] or size, p["target_size"] or size
        if not self.img2img:  # ref: StableDiffusionXLPipeline.__call__: [neg, pos] pair repeated per image
            positive = conditioning.base_time_ids(original, p["crops_coords_top_left"], target)
            negative = positive
            if p["negative_original_size"] is not None and p["negative_target_size"] is not None:
                negative = conditioning.base_time_ids(
                    p["negative_original_size"], p["negative_crops_coords_top_left"], p["negative_target_size"]
                )
            return conditioning.cfg_time_ids(negative, positive, batch, self.do_cfg)
        # ref: StableDiffusionXLImg2ImgPipeline.__call__ / _get_add_time_ids: all negatives, then all positives
        neg_original = p["negative_original_size"] or original
        neg_target = p["negative_target_size"] or target
        if self.pipe.requires_aesthetics_score:
            positive = conditioning.refiner_time_ids(original, p["crops_coords_top_left"], p["aesthetic_score"])
            negative = conditioning.refiner_time_ids(
                neg_original, p["negative_crops_coords_top_left"], p["negative_aesthetic_score"]
            )
        else:  # diffusers takes the positive crop for the negative here
            positive = conditioning.base_time_ids(original, p["crops_coords_top_left"], target)
            negative = conditioning.base_time_ids(neg_original, p["crops_coords_top_left"], neg_target)
        rows = [np.tile(negative, (batch, 1))] if self.do_cfg else []
        return np.concatenate([*rows, np.tile(positive, (batch, 1))])  # [2B, n] or [B, n]

    def _conditioning(self, height: int, width: int) -> dict[str, np.ndarray]:
        p, pipe = self.p, self.pipe
        try:
            emb = encode_prompt(
                pipe.text_encoders, p["prompt"], p["prompt_2"], p["negative_prompt"], p["negative_prompt_2"],
                int(p["num_images_per_prompt"]), self.do_cfg, pipe.force_zeros_for_empty_prompt, p["clip_skip"],
            )  # fmt: skip
        except ValueError as e:
            raise RuntimeInputError(str(e)) from None
        if self.do_cfg:
            embeds = np.concatenate([emb.negative_embeds, emb.embeds])  # [2B, 77, 2048]
            pooled = np.concatenate([emb.negative_pooled, emb.pooled])  # [2B, 1280]
        else:
            embeds, pooled = emb.embeds, emb.pooled
        inputs = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": self._time_ids(height, width)}
        if pipe.time_cond_proj_dim:
            w = conditioning.guidance_embedding(p["guidance_scale"] - 1, self.batch, pipe.time_cond_proj_dim)
            inputs["timestep_cond"] = w  # [B, d]
        return inputs

    # -- initial latents ---------------------------------------------------------------------------------
    def _text2img_latents(self, generator: TorchGenerator) -> np.ndarray:
        p, pipe, f = self.p, self.pipe, self.pipe.vae_scale_factor
        height, width = int(p["height"] or pipe.default_size), int(p["width"] or pipe.default_size)
        shape = (self.batch, int(pipe.unet_config.get("in_channels", 4)), height // f, width // f)
        if p["latents"] is not None:
            latents = np.asarray(p["latents"], dtype=np.float32)
            if latents.shape != shape:
                raise RuntimeInputError(f"latents have shape {list(latents.shape)}, expected {list(shape)}")
        else:
            latents = generator.randn(shape)
        return (latents * np.float32(self.plan.init_noise_sigma)).astype(np.float32)

    def _img2img_latents(self, generator: TorchGenerator) -> np.ndarray:
        """# ref: diffusers StableDiffusionXLImg2ImgPipeline.prepare_latents"""
        p, pipe, image = self.p, self.pipe, self._image
        if p["latents"] is not None:
            return np.asarray(p["latents"], dtype=np.float32)
        if image.shape[1] == 4:  # latents given as the image: no encode, no scaling
            init = image
        else:
            init = pipe.encode_image(image, generator)  # [b, 4, h, w], scaled
        if self.batch % init.shape[0]:
            raise RuntimeInputError(f"cannot spread {init.shape[0]} images over {self.batch} generations")
        init = np.concatenate([init] * (self.batch // init.shape[0]))
        if p["denoising_start"] is not None:  # the refiner continues the base's latents: no new noise
            return init.astype(np.float32)
        return self.plan.add_noise(init, generator.randn(init.shape)).astype(np.float32)

    # -- the loop ----------------------------------------------------------------------------------------
    def _denoiser(self, inputs: dict[str, np.ndarray], sample_shape: tuple[int, ...]):
        """model(x_in, t) for the sampler: one UNet call (batch 2B under guidance), then guidance."""
        unet, p, batch = self.pipe.unet, self.p, self.batch
        m = 2 * batch if self.do_cfg else batch
        ts_shape = tuple(d.get_length() if d.is_static else 1 for d in unet.input_shapes["timestep"])
        shapes = {"sample": (m, *sample_shape[1:]), "timestep": ts_shape, **{k: v.shape for k, v in inputs.items()}}
        request = unet.compile(shapes)
        keep = unet.prepare({**inputs, "sample": np.zeros(shapes["sample"], np.float32),
                             "timestep": np.zeros(ts_shape, np.float32)})  # fmt: skip
        for k in inputs:  # set once; per step only sample and timestep change
            request.set_tensor(k, ov.Tensor(keep[k], shared_memory=True))
        ts_type = unet.input_types["timestep"]
        g, rescale = np.float32(p["guidance_scale"]), float(p["guidance_rescale"])

        def model(x_in: np.ndarray, t: float) -> np.ndarray:
            sample = np.concatenate([x_in, x_in]) if self.do_cfg else np.ascontiguousarray(x_in, np.float32)
            request.set_tensor("sample", ov.Tensor(sample, shared_memory=True))
            request.set_tensor("timestep", ov.Tensor(np.full(ts_shape, t, dtype=ts_type)))
            request.infer()
            out = request.get_tensor("out_sample").data
            if not self.do_cfg:
                return out.copy()
            uncond, text = out[:batch], out[batch:]
            guided = uncond + g * (text - uncond)
            if rescale > 0:
                guided = conditioning.rescale_guidance(guided, text, rescale)
            return guided

        model.keep_alive = keep  # the shared input buffers must outlive the request's use of them
        return model

    def _steps(self) -> Iterator[StepState]:
        generator = TorchGenerator(int(self.p["seed"]))
        if self.img2img:
            latents = self._img2img_latents(generator)
        else:
            latents = self._text2img_latents(generator)
        f = self.pipe.vae_scale_factor
        inputs = self._conditioning(latents.shape[2] * f, latents.shape[3] * f)
        # low memory: each model is compiled when its stage starts and released when it ends; otherwise each
        # keeps its weights and compiled graph, and only its activation buffers are freed between stages
        for enc in self.pipe.text_encoders:
            self._done_with(enc.encoder)
        model = self._denoiser(inputs, latents.shape)
        total = len(self.plan.timesteps)
        for state in self.plan.sample(latents, model, generator.randn):
            latents = state.latents
            yield StepState(state.index, total, float(state.timestep), latents, state.denoised)
        self._latents = latents
        del model
        self._done_with(self.pipe.unet)

    def _done_with(self, model) -> None:
        """A model's stage has ended: release it (low memory) or free its activation buffers."""
        if self.pipe.low_memory:
            model.release()
        else:
            model.trim()

    def __iter__(self) -> Iterator[StepState]:
        if self._iter is None:
            self._iter = self._steps()
        return self._iter

    def result(self) -> GenerationResult:
        for _ in self:  # run what is left of the loop
            pass
        latents = self._latents
        params = {k: v for k, v in self.p.items() if k not in ("latents", "image")}
        if self.p["output_type"] == "latent":
            return GenerationResult(latents, None, params)
        images = self.pipe.decode(latents)
        self._done_with(self.pipe.vae_decoder)
        return GenerationResult(latents, images, params)
