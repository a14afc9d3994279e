"""Input normalisation, owned by the model side: uint8 pixels become the float input every tower was
trained on (ImageNet mean/std). Data stays uint8 up to the device; exports record the same statistics."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float, ImageNet mean/std (done on the device, after transfer)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=dtype).view(3, 1, 1)
    return (images.to(dtype) / 255.0 - mean) / std
