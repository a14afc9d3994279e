"""Deterministic evaluation views of a PIL image (uint8; `harmony.models.normalize` runs on the device)."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from harmony.data.rgb import WHITE, to_rgb


def to_uint8_tensor(image: Image.Image, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """PIL image (any mode) -> uint8 [3, H, W]; transparency composited on `background`."""
    image = to_rgb(image, background)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def eval_transform(image: Image.Image, size: int, resize_ratio: float = 1.0) -> torch.Tensor:
    """Deterministic evaluation view: resize the short side to size / ratio, centre-crop `size`."""
    img = to_uint8_tensor(image)
    short = round(size / resize_ratio)
    img = TF.resize(img, [short], antialias=True)
    return TF.center_crop(img, [size, size])
