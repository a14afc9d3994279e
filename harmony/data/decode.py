"""Raw samples; opening untrusted image bytes safely and decoding them at the scale the crops need.

`open_image` reads only the header, so an oversized image (a decompression bomb) is refused before
any pixel buffer exists. `decode_pixels` asks libjpeg for a reduced DCT scale (1/2, 1/4, 1/8) when
every planned crop still gets at least its output resolution, then returns uint8 HWC RGB pixels.
Anything unusable raises `SampleError`, which the loader counts and skips.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from harmony.data.augment import CropPlan
from harmony.data.errors import SampleError

DEFAULT_MAX_PIXELS = 8192 * 8192


@dataclass
class RawSample:
    """One (image, caption) pair as a source hands it out; `image` may be opened lazily (header only)."""

    key: str
    image: Image.Image
    caption: str


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Header-only open of an image file's bytes; refuses images above `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SampleError("image", f"image refused: {exc}") from None
    except Exception as exc:  # any decoder failure on untrusted bytes means "not an image"
        raise SampleError("image", f"not a readable image ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > max_pixels or min(width, height) < 1:
        raise SampleError("image", f"{width}x{height} image refused (data.max_image_pixels={max_pixels})")
    return image


def draft_scale(plans: list[CropPlan]) -> int:
    """Largest JPEG reduction (1, 2, 4 or 8) that keeps every planned crop at or above its output size."""
    room = min(min(p.box[2], p.box[3]) / p.size for p in plans) if plans else 1.0
    return next((s for s in (8, 4, 2) if s <= room), 1)


def decode_pixels(image: Image.Image, plans: list[CropPlan]) -> tuple[np.ndarray, tuple[float, float]]:
    """uint8 [H, W, 3] RGB pixels and their (y, x) scale relative to `image.size`."""
    width, height = image.size
    scale = draft_scale(plans)
    try:
        if scale > 1 and image.format == "JPEG":
            image.draft("RGB", (width // scale, height // scale))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # palette transparency notes
            if image.mode == "P":
                image = image.convert("RGBA")
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            pixels = np.asarray(rgb)
    except Exception as exc:  # truncated or corrupt data surfaces here, in whatever type the codec raises
        raise SampleError("image", f"image data unreadable ({type(exc).__name__}: {exc})") from None
    return pixels, (pixels.shape[0] / height, pixels.shape[1] / width)
