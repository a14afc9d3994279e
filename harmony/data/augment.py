"""Multi-crop augmentation on uint8 tensors, driven by an explicit per-sample RNG.

Each sample's randomness comes from its own `random.Random(seed)` (seed = f(run seed, epoch,
sample id)), so crops do not depend on worker count or order, and resumed runs replay them exactly.
Images stay uint8 until the model normalises them on the device.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from harmony.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> uint8 [3, H, W]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float, ImageNet mean/std (done on the device, after transfer)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=dtype).view(3, 1, 1)
    return (images.to(dtype) / 255.0 - mean) / std


def crop_box(
    height: int, width: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): area fraction in `scale`, log-uniform aspect ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(img: torch.Tensor, strength: tuple[float, float, float, float], rng: random.Random) -> torch.Tensor:
    """Brightness, contrast, saturation, hue in random order (torchvision ColorJitter semantics)."""
    b, c, s, h = strength
    ops = list(range(4))
    rng.shuffle(ops)
    for op in ops:
        if op == 0 and b > 0:
            img = TF.adjust_brightness(img, rng.uniform(max(0.0, 1 - b), 1 + b))
        elif op == 1 and c > 0:
            img = TF.adjust_contrast(img, rng.uniform(max(0.0, 1 - c), 1 + c))
        elif op == 2 and s > 0:
            img = TF.adjust_saturation(img, rng.uniform(max(0.0, 1 - s), 1 + s))
        elif op == 3 and h > 0:
            img = TF.adjust_hue(img, rng.uniform(-h, h))
    return img


def gaussian_blur(img: torch.Tensor, rng: random.Random, reference_size: int = 224) -> torch.Tensor:
    """Blur with sigma ~ U(0.1, 2.0) at 224 px, scaled to the crop size (same look at any resolution)."""
    sigma = rng.uniform(0.1, 2.0) * img.shape[-1] / reference_size
    kernel = max(3, 2 * math.ceil(3 * sigma) + 1)
    return TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma])


def augment_crop(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    cfg: AugmentConfig,
    rng: random.Random,
    blur: float,
    solarize: float,
) -> torch.Tensor:
    """One crop of iBOT's recipe: resized crop, flip, colour jitter, grayscale, blur, solarise."""
    top, left, h, w = crop_box(img.shape[-2], img.shape[-1], scale, rng)
    out = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    if rng.random() < cfg.flip:
        out = TF.horizontal_flip(out)
    if rng.random() < cfg.color_jitter:
        out = color_jitter(out, cfg.jitter_strength, rng)
    if rng.random() < cfg.grayscale:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    if rng.random() < blur:
        out = gaussian_blur(out, rng)
    if rng.random() < solarize:
        out = TF.solarize(out, 128)
    return out


def global_crop(img: torch.Tensor, index: int, cfg: AugmentConfig, rng: random.Random) -> torch.Tensor:
    """Global crop `index` (0: always blurred; 1: rarely blurred, sometimes solarised; more: like 1)."""
    i = min(index, len(cfg.global_blur) - 1)
    return augment_crop(img, cfg.global_size, cfg.global_scale, cfg, rng, cfg.global_blur[i], cfg.global_solarize[i])


def local_crop(img: torch.Tensor, cfg: AugmentConfig, rng: random.Random) -> torch.Tensor:
    return augment_crop(img, cfg.local_size, cfg.local_scale, cfg, rng, cfg.local_blur, 0.0)


def eval_transform(image: Image.Image, size: int, resize_ratio: float = 1.0) -> torch.Tensor:
    """Deterministic evaluation view: resize the short side to size / ratio, centre-crop `size`."""
    img = to_uint8_tensor(image)
    short = round(size / resize_ratio)
    img = TF.resize(img, [short], antialias=True)
    return TF.center_crop(img, [size, size])
