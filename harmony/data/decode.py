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

from harmony.core.colors import WHITE
from harmony.data.augment import CropPlan
from harmony.data.errors import SampleError
from harmony.data.rgb import to_rgb

DEFAULT_MAX_PIXELS = 8192 * 8192
# image files read from folders (conversion, evaluation), by suffix; shards name their images by extension
IMAGE_FILE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright (as `PIL.ImageOps.exif_transpose`)
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class RawSample:
    """One (image, caption) pair as a source hands it out; `image` may be opened lazily (header only).
    `origin` is the image's path in the user's folder or table, when known (inspect's sort check)."""

    key: str
    image: Image.Image
    caption: str
    origin: str = ""


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Header-only open of an image file's bytes; refuses images above `max_pixels`."""
    if not data:
        raise SampleError("image", "empty image file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SampleError("image", f"image refused: {exc}") from None
    except Image.UnidentifiedImageError:
        raise SampleError("image", f"not an image file (starts with {data[:8]!r})") from None
    except Exception as exc:  # any decoder failure on untrusted bytes means "not an image"
        raise SampleError("image", f"not a readable image ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > max_pixels or min(width, height) < 1:
        raise SampleError("image", f"{width}x{height} image refused (data.max_image_pixels={max_pixels})")
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: upright) of an opened image, read from its header; 1 when absent or unreadable.
    (A PNG whose eXIf chunk follows the pixel data is taken as upright: finding it would decode the image.)"""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block on untrusted bytes: treat as upright
        return 1
    return value if isinstance(value, int) and value in UPRIGHT else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is meant to be seen: camera JPEGs store portraits sideways plus an
    EXIF orientation, which crop plans and size reports must follow."""
    width, height = image.size
    return (height, width) if orientation(image) in (5, 6, 7, 8) else (width, height)


def upright(image: Image.Image, turn: int | None = None) -> Image.Image:
    """`image` with EXIF orientation `turn` (default: its own) applied; the same image when upright. (Pass
    `turn` for an image derived from the file, as conversions do not keep the EXIF block reliably.)"""
    method = UPRIGHT.get(orientation(image) if turn is None else turn)
    return image if method is None else image.transpose(method)


def draft_scale(plans: list[CropPlan]) -> int:
    """Largest JPEG reduction (1, 2, 4 or 8) that keeps every planned crop at or above its output size."""
    room = min(min(p.box[2], p.box[3]) / p.size for p in plans) if plans else 1.0
    return next((s for s in (8, 4, 2) if s <= room), 1)


def decode_pixels(
    image: Image.Image, plans: list[CropPlan], background: tuple[int, int, int] = WHITE
) -> tuple[np.ndarray, tuple[float, float]]:
    """Upright uint8 [H, W, 3] RGB pixels and their (y, x) scale relative to `upright_size(image)`;
    transparent pixels are composited on `background` (data.alpha_background)."""
    width, height = upright_size(image)
    scale = draft_scale(plans)
    try:
        if scale > 1 and image.format == "JPEG":
            image.draft("RGB", (image.width // scale, image.height // scale))
        pixels = np.asarray(to_rgb(upright(image), background))
    except Exception as exc:  # truncated or corrupt data surfaces here, in whatever type the codec raises
        raise SampleError("image", f"image data unreadable ({type(exc).__name__}: {exc})") from None
    return pixels, (pixels.shape[0] / height, pixels.shape[1] / width)
