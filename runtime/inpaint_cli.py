"""The command line's inpainting and outpainting options (runtime.generate calls these; runtime.inpaint does the
work): --mask, --padding-mask-crop, --mask-blur, --outpaint LEFT,TOP,RIGHT,BOTTOM."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.errors import RuntimeInputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inpainting and outpainting (with --image; README: Inpainting and outpainting)")
    g.add_argument("--mask", type=Path, default=None, help="mask image: white is repainted, black is kept")
    g.add_argument(
        "--padding-mask-crop",
        type=int,
        default=None,
        metavar="PX",
        help="inpaint only the mask's box grown by PX pixels, at full size, then paste it back (diffusers' "
        "padding_mask_crop)",
    )
    g.add_argument(
        "--mask-blur", type=float, default=None, metavar="PX", help="Gaussian blur of the mask (mask_processor.blur)"
    )
    g.add_argument(
        "--outpaint",
        default=None,
        metavar="LEFT,TOP,RIGHT,BOTTOM",
        help="extend --image by these pixels (the new border is repainted; sizes rounded up to multiples of 8)",
    )


def _sides(text: str) -> tuple[int, int, int, int]:
    try:
        sides = tuple(int(v) for v in text.split(","))
    except ValueError:
        sides = ()
    if len(sides) != 4 or min(sides) < 0 or not any(sides):
        raise RuntimeInputError(f"--outpaint {text}: four non-negative pixel counts LEFT,TOP,RIGHT,BOTTOM, not all 0")
    return sides  # type: ignore[return-value]


def inpaint_kwargs(args) -> dict:
    """The generation's inpainting parameters from the command line ({} without --mask or --outpaint). The size
    defaults to the image's (rounded down to multiples of 8), not the model's as in diffusers' Python call."""
    if args.mask is None and args.outpaint is None:
        if args.padding_mask_crop is not None or args.mask_blur is not None:
            raise RuntimeInputError("--padding-mask-crop and --mask-blur need --mask or --outpaint")
        return {}
    if args.image is None:
        raise RuntimeInputError("--mask and --outpaint need --image")
    if args.mask is not None and args.outpaint is not None:
        raise RuntimeInputError("choose one of --mask and --outpaint (which makes its own mask)")
    from PIL import Image

    from runtime.inpaint import _open, outpaint

    image = _open(args.image, "--image")
    if not isinstance(image, Image.Image):
        raise RuntimeInputError(f"--image {args.image}: not an image")
    if args.outpaint is not None:
        image, mask = outpaint(image, *_sides(args.outpaint))
    else:
        mask = args.mask
    width, height = image.size
    kwargs = dict(image=image if args.outpaint is not None else args.image, mask_image=mask,
                  padding_mask_crop=args.padding_mask_crop, mask_blur=args.mask_blur, strength=args.strength,
                  height=args.height or height - height % 8, width=args.width or width - width % 8)  # fmt: skip
    if kwargs["height"] <= 0 or kwargs["width"] <= 0:
        raise RuntimeInputError(f"--image {args.image}: {width}x{height} is smaller than 8 pixels")
    return kwargs
