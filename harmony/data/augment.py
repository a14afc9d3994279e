"""Multi-crop augmentation (iBOT's recipe) in two steps: plan, then render.

`plan_global` / `plan_local` draw everything random about a crop from the sample's own
`random.Random(seed)` using only the image size, before any pixel is decoded: so crops do not
depend on worker count or order, resumed runs replay them, and the decoder can pick a reduced JPEG
scale that still serves every planned crop. `render_crop` then applies the plan to uint8 HWC
pixels with OpenCV (crop as a view, anti-aliased bicubic resize, LUT-based colour ops, Gaussian blur):
images stay uint8 until the model normalises them on the device (`harmony.models.normalize`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from harmony.config import AugmentConfig

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
_IDENTITY = np.arange(256, dtype=np.float64)
_SOLARIZE = np.where(_IDENTITY >= 128, 255 - _IDENTITY, _IDENTITY).astype(np.uint8)
cv2.setNumThreads(0)  # sequential: loader workers give the parallelism, and OpenCV's pool is not fork-safe


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


@dataclass(frozen=True)
class CropPlan:
    """Everything random about one crop. `box` is (top, left, h, w) in full-resolution source pixels;
    `jitter` lists (op, factor) in application order; `blur_sigma` 0 means no blur."""

    box: tuple[int, int, int, int]
    size: int
    flip: bool = False
    jitter: tuple[tuple[int, float], ...] = ()
    grayscale: bool = False
    blur_sigma: float = 0.0
    solarize: bool = False


def jitter_plan(strength: tuple[float, float, float, float], rng: random.Random) -> tuple[tuple[int, float], ...]:
    """ColorJitter's factors in a random order: brightness, contrast, saturation ~ U(1-s, 1+s), hue ~ U(-h, h)."""
    ops = list(range(4))
    rng.shuffle(ops)
    plan = []
    for op in ops:
        s = strength[op]
        if s > 0:
            plan.append((op, rng.uniform(-s, s) if op == HUE else rng.uniform(max(0.0, 1 - s), 1 + s)))
    return tuple(plan)


def plan_crop(
    height: int,
    width: int,
    size: int,
    scale: tuple[float, float],
    cfg: AugmentConfig,
    rng: random.Random,
    blur: float,
    solarize: float,
) -> CropPlan:
    """One crop of iBOT's recipe: resized crop, flip, colour jitter, grayscale, blur, solarise."""
    box = crop_box(height, width, scale, rng)
    flip = rng.random() < cfg.flip
    jitter = jitter_plan(cfg.jitter_strength, rng) if rng.random() < cfg.color_jitter else ()
    gray = rng.random() < cfg.grayscale
    sigma = rng.uniform(0.1, 2.0) * size / 224 if rng.random() < blur else 0.0
    return CropPlan(box, size, flip, jitter, gray, sigma, rng.random() < solarize)


def plan_global(height: int, width: int, index: int, cfg: AugmentConfig, rng: random.Random) -> CropPlan:
    """Global crop `index` (0: always blurred; 1: rarely blurred, sometimes solarised; more: like 1)."""
    i = min(index, len(cfg.global_blur) - 1)
    return plan_crop(
        height, width, cfg.global_size, cfg.global_scale, cfg, rng, cfg.global_blur[i], cfg.global_solarize[i]
    )


def plan_local(height: int, width: int, cfg: AugmentConfig, rng: random.Random) -> CropPlan:
    return plan_crop(height, width, cfg.local_size, cfg.local_scale, cfg, rng, cfg.local_blur, 0.0)


def _lut(img: np.ndarray, values: np.ndarray) -> np.ndarray:
    return cv2.LUT(img, np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def adjust(img: np.ndarray, op: int, factor: float) -> np.ndarray:
    """One colour-jitter op on uint8 RGB (torchvision semantics: blend with black, the grey mean,
    the grey image; hue shifted in HSV)."""
    if op == BRIGHTNESS:
        return _lut(img, _IDENTITY * factor)
    if op == CONTRAST:
        return _lut(img, _IDENTITY * factor + (1 - factor) * float(_gray(img).mean()))
    if op == SATURATION:
        gray = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
        return cv2.addWeighted(img, factor, gray, 1 - factor, 0)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(round(factor * 256) % 256)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def resize(region: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize to size x size, anti-aliased: Gaussian-pyramid halvings (cv2.pyrDown) first while the
    region is at least twice the output, so the bicubic step never shrinks by 2x or more (5x faster than
    area averaging at similar quality)."""
    while min(region.shape[:2]) >= 2 * size:
        region = cv2.pyrDown(region)
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_CUBIC)


def render_crop(pixels: np.ndarray, plan: CropPlan, factor: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Apply a plan to uint8 HWC RGB `pixels`, decoded at `factor` (y, x) of full resolution."""
    top, left, h, w = plan.box
    fy, fx = factor
    y0, x0 = round(top * fy), round(left * fx)
    y1, x1 = max(y0 + 1, round((top + h) * fy)), max(x0 + 1, round((left + w) * fx))
    out = resize(pixels[y0:y1, x0:x1], plan.size)
    if plan.flip:
        out = cv2.flip(out, 1)
    for op, value in plan.jitter:
        out = adjust(out, op, value)
    if plan.grayscale:
        out = cv2.cvtColor(_gray(out), cv2.COLOR_GRAY2RGB)
    if plan.blur_sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), plan.blur_sigma)
    if plan.solarize:
        out = cv2.LUT(out, _SOLARIZE)
    return out


def render_crops(pixels: np.ndarray, plans: list[CropPlan], factor: tuple[float, float]) -> torch.Tensor:
    """Crops of one size as contiguous uint8 [N, 3, S, S]; `cv2.split` writes each crop's channel planes
    straight into the output (the HWC -> CHW copy at memory speed)."""
    size = plans[0].size
    out = np.empty((len(plans), 3, size, size), dtype=np.uint8)
    for i, plan in enumerate(plans):
        cv2.split(render_crop(pixels, plan, factor), [out[i, 0], out[i, 1], out[i, 2]])
    return torch.from_numpy(out)
