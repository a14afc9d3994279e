"""Deterministic evaluation views of a PIL image (uint8; `harmony.models.normalize` runs on the device)."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from harmony.core.colors import WHITE
from harmony.data.rgb import to_rgb


def to_uint8_tensor(image: Image.Image, background: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """PIL image (any mode) -> uint8 [3, H, W]; transparency composited on `background`."""
    image = to_rgb(image, background)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def eval_transform(image: Image.Image, size: int) -> torch.Tensor:
    """Deterministic evaluation view: resize the short side to `size`, centre-crop `size` x `size`."""
    img = to_uint8_tensor(image)
    img = TF.resize(img, [size], antialias=True)
    return TF.center_crop(img, [size, size])
