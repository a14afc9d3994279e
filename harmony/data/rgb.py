"""Any PIL image to RGB, compositing transparency on a background instead of dropping it to black.

PIL's `convert("RGB")` discards alpha, so a line drawing on a transparent canvas becomes a black
square; it also clips 16-bit greyscale (mode I;16, e.g. scans and medical PNGs) to 255, so all but the
darkest pixels turn white. Every place that turns a user's image into RGB pixels (training, conversion, inspection,
evaluation) goes through `to_rgb`. Background colours are named and parsed in `harmony.core.colors`.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from harmony.core.colors import WHITE

WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale as PIL opens it


def has_transparency(image: Image.Image) -> bool:
    """True for modes with alpha and for palette/greyscale/RGB images with a transparency entry."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """`image` as mode RGB; transparent pixels are alpha-composited over `background`."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in WIDE_GREY_MODES:
        wide = np.asarray(image).astype(np.int64)
        return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if not has_transparency(image):
        return image.convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "palette images with transparency ..." note
        rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")
