"""Inpainting and outpainting, as diffusers' StableDiffusionXLInpaintPipeline (v0.42) does them.

Two kinds of UNet (ModelInfo.is_inpainting tells them apart from the folder's unet/config.json):
- a plain 4-channel UNet (base, SSD-1B, Vega, LCM): after every step the unmasked latents are replaced by the
  image's latents noised to the next timestep (`Inpainting.blend`);
- a 9-channel inpainting UNet: the UNet sees [latents, mask, masked-image latents] (`Inpainting.model`).
The image and mask preprocessing mirrors diffusers' VaeImageProcessor (image_processor, and mask_processor with
do_normalize=False, do_binarize=True, do_convert_grayscale=True) with PIL's own resampling, so that the same
seed gives diffusers' picture. Random draws come in diffusers' order: image encode (posterior sample), the
initial noise, the masked-image encode, then the sampler's step noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from runtime.errors import RuntimeInputError

__all__ = ["Inpainting", "blur", "crop_region", "outpaint", "apply_overlay"]


# -- PIL-level helpers: diffusers VaeImageProcessor's static methods ---------------------------------------------
def _open(image, name: str):
    """A path, PIL image or array -> a PIL image (uint8 arrays) or the float array itself; one-line errors."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                im.load()
                return im.copy()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RuntimeInputError(f"{name} {image}: not a readable image ({e})") from None
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim == 4 and image.shape[-1] in (1, 3, 4):  # [1, H, W, C]
            if len(image) != 1:
                raise RuntimeInputError(f"{name}: {len(image)} images; inpainting takes one")
            image = image[0]
        if image.dtype == np.uint8 and image.ndim in (2, 3) and (image.ndim == 2 or image.shape[-1] in (1, 3, 4)):
            return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
        return image
    raise RuntimeInputError(f"{name} must be an image (a path, PIL image or array), got {type(image).__name__}")


def blur(mask: Image.Image, blur_factor: float) -> Image.Image:
    """# ref: diffusers VaeImageProcessor.blur (PIL GaussianBlur)"""
    return mask.filter(ImageFilter.GaussianBlur(blur_factor))


def crop_region(mask: Image.Image, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) holding every masked pixel, padded, grown to width:height's aspect ratio.
    # ref: diffusers VaeImageProcessor.get_crop_region"""
    m = np.array(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero((m != 0).any(axis=0)), np.flatnonzero((m != 0).any(axis=1))
    x1, y1 = int(max(cols[0] - pad, 0)), int(max(rows[0] - pad, 0))
    x2, y2 = int(min(cols[-1] + 1 + pad, w)), int(min(rows[-1] + 1 + pad, h))
    ratio_crop, ratio = (x2 - x1) / (y2 - y1), width / height
    if ratio_crop > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """[lo, hi) widened by diff, centred, shifted back inside [0, limit) (one axis of get_crop_region)."""
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def _resize(image: Image.Image, width: int, height: int, mode: str = "default") -> Image.Image:
    """# ref: diffusers VaeImageProcessor.resize (PIL: default), _resize_and_fill (fill), _resize_and_crop (crop)"""
    if mode == "default":
        return image.resize((width, height), resample=Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "fill" and ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))  # fmt: skip
    elif mode == "fill" and ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))  # fmt: skip
    return res


def nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """[B, C, H, W] -> [B, C, height, width] by nearest neighbour, torch's index rule (floor(i * in / out)).
    # ref: torch.nn.functional.interpolate(mode="nearest")"""
    h, w = x.shape[-2:]
    rows = np.minimum(np.floor(np.arange(height, dtype=np.float32) * np.float32(h / height)).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(width, dtype=np.float32) * np.float32(w / width)).astype(int), w - 1)
    return np.ascontiguousarray(x[..., rows[:, None], cols[None, :]])


def apply_overlay(mask: Image.Image, init: Image.Image, image: Image.Image, crops=None) -> Image.Image:
    """The inpainted image pasted over the original where the mask is (padding_mask_crop's final step).
    # ref: diffusers VaeImageProcessor.apply_overlay"""
    width, height = init.width, init.height
    masked = Image.new("RGBa", (width, height))
    masked.paste(init.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    masked = masked.convert("RGBA")
    if crops is not None:
        x, y, x2, y2 = crops
        base = Image.new("RGBA", (width, height))
        base.paste(_resize(image, x2 - x, y2 - y, "crop"), (x, y))
        image = base.convert("RGB")
    image = image.convert("RGBA")
    image.alpha_composite(masked)
    return image.convert("RGB")


def outpaint(image, left: int, top: int, right: int, bottom: int, multiple: int = 8):
    """Outpainting's inputs: (the image padded by the given pixels, its mask: white over the new border). The
    border is filled with the image's edge pixels (stretched), a neutral start the model repaints; the padded size
    is rounded up to a multiple of `multiple` (the extra pixels go to the right and bottom borders)."""
    image = _open(image, "image")
    if not isinstance(image, Image.Image):
        raise RuntimeInputError("outpaint needs an 8-bit image (a path, PIL image or uint8 array)")
    if any(not isinstance(v, int) or v < 0 for v in (left, top, right, bottom)) or not left + top + right + bottom:
        raise RuntimeInputError(f"outpaint {left},{top},{right},{bottom}: four non-negative pixel counts, not all 0")
    image = image.convert("RGB")
    w, h = image.width + left + right, image.height + top + bottom
    right += -w % multiple
    bottom += -h % multiple
    w, h = image.width + left + right, image.height + top + bottom
    arr = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full((h, w), 255, np.uint8)
    mask[top : top + image.height, left : left + image.width] = 0
    return Image.fromarray(arr), Image.fromarray(mask)


def _size(x, is_mask: bool) -> tuple[int, int]:
    """(width, height) of a PIL image or an array: masks [H, W], [H, W, C] or [B, 1, H, W]; images [H, W, 3] or
    [B, H, W, 3]."""
    if isinstance(x, Image.Image):
        return x.size
    shape = x.shape
    if is_mask and len(shape) == 4:
        return shape[3], shape[2]
    return (shape[2], shape[1]) if len(shape) == 4 else (shape[1], shape[0])


# -- one generation's inpainting ----------------------------------------------------------------------------------
class Inpainting:
    """The image, mask and latents of one inpainting generation (diffusers' steps 5-7 and the loop's blend)."""

    def __init__(self, info, params, handoff: bool = False):
        self.info = info
        self.four = not info.is_inpainting
        p = params
        if p.image is None and not handoff:
            raise RuntimeInputError("mask_image needs an image to inpaint")
        image = None if p.image is None else _open(p.image, "image")
        mask = _open(p.mask_image, "mask_image")
        latents = isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == info.latent_channels
        if (handoff or latents) and p.padding_mask_crop is not None:
            raise RuntimeInputError("padding_mask_crop needs an image, not latents")
        if isinstance(mask, Image.Image):
            if mask.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "F"):
                raise RuntimeInputError(f"mask_image: unsupported image mode {mask.mode}")
            if p.mask_blur:  # the caller's mask_processor.blur(mask, blur_factor) before the call
                mask = blur(mask, p.mask_blur)
            if not np.asarray(mask.convert("L")).any():
                raise RuntimeInputError("mask_image is all zero (black): nothing to inpaint")
        else:
            mask = np.asarray(mask)
            if mask.dtype.kind not in "fiub" or mask.ndim not in (2, 3, 4) or not np.isfinite(mask).all():
                raise RuntimeInputError(f"mask_image array of shape {list(mask.shape)}: expected [H, W] in [0, 1]")
            if p.mask_blur:
                raise RuntimeInputError("mask_blur needs an 8-bit mask image")
            if not mask.any():
                raise RuntimeInputError("mask_image is all zero (black): nothing to inpaint")
        self.params, self.mask_pil = p, mask
        self.latent_image = handoff or latents
        if image is not None:
            self.start_from(image)

    def start_from(self, image) -> None:
        """The image (pixels, or latents: the base's in a hand-off) and everything made from it at its size."""
        p, mask, f = self.params, self.mask_pil, self.info.vae_scale_factor
        if not self.latent_image:
            self._check_sizes(image, mask)
        # ref: StableDiffusionXLInpaintPipeline.__call__ step 0: the UNet's size unless given (latents: theirs)
        if self.latent_image:
            default_h, default_w = image.shape[2] * f, image.shape[3] * f
        else:
            default_h = default_w = self.info.default_size
        self.height, self.width = p.height or default_h, p.width or default_w
        self.crops, mode = None, "default"
        if p.padding_mask_crop is not None:
            if not isinstance(image, Image.Image) or not isinstance(mask, Image.Image):
                raise RuntimeInputError("padding_mask_crop needs 8-bit images (paths, PIL images or uint8 arrays)")
            self.crops, mode = crop_region(mask, self.width, self.height, p.padding_mask_crop), "fill"
        self.original = image  # apply_overlay's input
        self.image = np.asarray(image, np.float32) if self.latent_image else self._image(image, mode)
        self.mask = self._mask(mask, mode)  # [1, 1, H, W] in {0, 1}
        # ref: __call__ step 5: the masked image (pixels only; latents cannot be masked)
        self.masked = None if self.latent_image else self.image * (self.mask < 0.5)

    @staticmethod
    def _check_sizes(image, mask) -> None:
        (mw, mh), (iw, ih) = _size(mask, True), _size(image, False)
        if (mw, mh) != (iw, ih):
            raise RuntimeInputError(f"mask_image is {mw}x{mh} but the image is {iw}x{ih}: they must be the same size")

    def _image(self, image, mode: str) -> np.ndarray:
        """# ref: diffusers VaeImageProcessor.preprocess (crop, resize, pil_to_numpy, normalize)"""
        if isinstance(image, Image.Image):
            if self.crops is not None:
                image = image.crop(self.crops)
            image = _resize(image, self.width, self.height, mode).convert("RGB")
            x = (np.asarray(image, np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]
        else:
            x = np.asarray(image, np.float32)
            x = x[None] if x.ndim == 3 else x
            if x.ndim != 4 or x.shape[-1] != 3:
                raise RuntimeInputError(f"image array of shape {list(x.shape)}: expected [H, W, 3] in [0, 1]")
            x = nearest(x.transpose(0, 3, 1, 2), self.height, self.width)
        if x.min() < 0:  # diffusers takes values below 0 as already in [-1, 1]
            return np.ascontiguousarray(x, np.float32)
        return np.ascontiguousarray(np.float32(2.0) * x - np.float32(1.0), np.float32)

    def _mask(self, mask, mode: str) -> np.ndarray:
        """# ref: diffusers VaeImageProcessor.preprocess with do_binarize, do_convert_grayscale, no normalize"""
        if isinstance(mask, Image.Image):
            if self.crops is not None:
                mask = mask.crop(self.crops)
            mask = _resize(mask, self.width, self.height, mode).convert("L")
            m = (np.asarray(mask, np.float32) / np.float32(255.0))[None, None]
        else:
            m = np.asarray(mask, np.float32)
            m = m[..., 0] if m.ndim == 3 and m.shape[-1] in (1, 3) else m
            m = m.reshape(1, 1, *m.shape[-2:])
            m = nearest(m, self.height, self.width)
        return np.where(m < 0.5, np.float32(0), np.float32(1)).astype(np.float32)

    # -- latents: ref StableDiffusionXLInpaintPipeline.prepare_latents, prepare_mask_latents -------------------
    def _encode(self, pipe, image: np.ndarray, generator, p) -> np.ndarray:
        """VAE posterior sample * scaling_factor (the inpaint pipeline applies no latents_mean/std); the tiny VAE's
        latents * its scaling_factor with vae_decoder="tiny" (diffusers' with pipe.vae = AutoencoderTiny).
        # ref: StableDiffusionXLInpaintPipeline._encode_vae_image"""
        info = self.info
        z = pipe.encode_image(image, generator, p.vae_tiling, p.vae_tile_size, p.vae_decoder)
        if p.vae_decoder == "tiny":
            return z
        if info.latents_mean is not None:  # undo encode_image's normalisation
            z = z * info.latents_std + info.latents_mean * info.scaling_factor
        return z.astype(np.float32)

    def prepare(self, gen, generator) -> np.ndarray:
        """The initial latents; keeps the noise, image latents, mask and masked-image latents for the loop."""
        if getattr(self, "image", None) is None:
            raise RuntimeInputError("a hand-off generation needs the base's latents (start_from) before it runs")
        pipe, p, info, plan = gen.pipe, gen.params, self.info, gen.plan
        f, batch = info.vae_scale_factor, gen.batch
        shape = (batch, info.latent_channels, self.height // f, self.width // f)
        strength_max = p.strength == 1.0  # diffusers' is_strength_max
        add_noise = p.denoising_start is None

        def spread(x):
            if batch % len(x):
                raise RuntimeInputError(f"cannot spread {len(x)} images over {batch} generations")
            return np.concatenate([x] * (batch // len(x)))

        image_latents = None
        if self.latent_image:
            image_latents = spread(np.asarray(self.image, np.float32))
            if image_latents.shape[2:] != shape[2:]:
                raise RuntimeInputError(f"image latents are {list(image_latents.shape)}, expected {list(shape)}")
        elif self.four or (p.latents is None and not strength_max):
            image_latents = spread(self._encode(pipe, self.image, generator, p))
        if p.latents is not None and add_noise:
            noise = np.asarray(p.latents, np.float32)
            if noise.shape != shape:
                raise RuntimeInputError(f"latents have shape {list(noise.shape)}, expected {list(shape)}")
            latents = noise * np.float32(plan.init_noise_sigma)
        else:
            noise = generator.randn(shape)
            if not add_noise:
                if image_latents is None:
                    raise RuntimeInputError("denoising_start with strength 1.0 and an inpainting UNet: no latents")
                latents = image_latents
            elif strength_max:
                latents = noise * np.float32(plan.init_noise_sigma)
            else:
                latents = plan.add_noise(image_latents, noise)
        self.noise, self.image_latents = noise, image_latents
        # prepare_mask_latents: the mask at the latent size, the masked image encoded (a draw of the generator
        # even where a 4-channel UNet does not use it: drawn, not encoded, to keep the order for less work; the
        # tiny VAE draws nothing)
        self.mask_latent = spread(nearest(self.mask, shape[2], shape[3]))
        self.masked_latents = None
        if self.masked is not None:
            if self.four:
                if p.vae_decoder != "tiny":
                    generator.randn((len(self.masked), *shape[1:]))
            else:
                self.masked_latents = spread(self._encode(pipe, self.masked, generator, p))
        if not self.four and self.masked_latents is None:
            raise RuntimeInputError("an inpainting UNet needs the image as pixels (the masked image), not latents")
        self.plan = plan
        return np.asarray(latents, np.float32)

    def sample_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The UNet's sample shape: 9 channels for an inpainting UNet."""
        return shape if self.four else (shape[0], self.info.in_channels, *shape[2:])

    def model(self, denoiser):
        """The model the sampler calls: an inpainting UNet sees [scaled latents, mask, masked-image latents].
        # ref: StableDiffusionXLInpaintPipeline.__call__ (torch.cat([latent_model_input, mask, masked_image_latents])"""
        if self.four:
            return denoiser
        extra = np.concatenate([self.mask_latent, self.masked_latents], axis=1)
        return lambda x_in, t: denoiser(np.concatenate([np.asarray(x_in, np.float32), extra], axis=1), t)

    def blend(self, state) -> None:
        """4-channel UNet: keep the image outside the mask, noised to the next timestep (not after the last step).
        In place: the sampler carries on from state.latents. # ref: the inpaint pipeline's denoising loop"""
        if not self.four:
            return
        init = self.image_latents
        if state.index < state.total - 1:
            init = self.plan.scheduler.add_noise(self.plan.schedule, self.plan.begin_index + state.index + 1,
                                                 init, self.noise)  # fmt: skip
        m = self.mask_latent
        state.latents[...] = (np.float32(1) - m) * init + m * state.latents

    def finish(self, images: np.ndarray) -> np.ndarray:
        """padding_mask_crop: each image pasted back into the original. # ref: image_processor.apply_overlay"""
        if self.crops is None:
            return images
        out = [apply_overlay(self.mask_pil, self.original, Image.fromarray(im), self.crops) for im in images]
        return np.stack([np.asarray(im) for im in out])


def check_options(p) -> dict:
    """GenerationParams' inpainting fields checked (one-line errors); returns the fixes (strength's default:
    diffusers' 0.3 for img2img, 0.9999 for inpainting)."""
    from runtime.params import MAX_SIDE, _is_int, _is_real

    fix = {}
    if p.strength is None:
        fix["strength"] = 0.9999 if p.mask_image is not None else 0.3
    elif not _is_real(p.strength) or not 0.0 <= p.strength <= 1.0:
        raise RuntimeInputError(f"strength={p.strength!r} must be in [0, 1]")
    if p.mask_image is None and (p.padding_mask_crop is not None or p.mask_blur is not None):
        raise RuntimeInputError("padding_mask_crop and mask_blur need a mask_image")
    c = p.padding_mask_crop
    if c is not None and (not _is_int(c) or not 0 <= c <= MAX_SIDE):
        raise RuntimeInputError(f"padding_mask_crop={c!r} must be an integer number of pixels in 0..{MAX_SIDE}")
    b = p.mask_blur
    if b is not None and (not _is_real(b) or not 0 <= b <= 1000):
        raise RuntimeInputError(f"mask_blur={b!r} must be a number of pixels in 0..1000")
    return fix
