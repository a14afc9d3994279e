"""The photometric half of a crop plan as batched tensor ops, for `device_augment`.

Crops are float [N, 3, S, S] in 0..255 on any device; every op rounds to whole levels afterwards, as the
worker path's uint8 OpenCV ops do, so the two paths agree to a few levels (see docs/performance.md).
Which crop gets which op comes from the plan table on the host, so no op waits on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harmony.data.augment import BRIGHTNESS, CONTRAST, HUE, SATURATION

# Columns of one crop's row in the plan table (see device_augment.encode_plan).
TOP, LEFT, HEIGHT, WIDTH, FLIP = range(5)
JITTER = 5  # 4 x (op, factor) in application order; op -1: none
GRAY, SIGMA, SOLARIZE = 13, 14, 15
PLAN_COLUMNS = 16
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # OpenCV's RGB2GRAY


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to whole levels in 0..255 (OpenCV's saturate_cast; half to even like np.rint)."""
    return x.round().clamp_(0, 255)


def gray(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> rounded luma [N, 1, H, W]."""
    r, g, b = GRAY_WEIGHTS
    return quantize(r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3])


def hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `turns` [N] (fractions of the circle) through HSV, like OpenCV's HSV_FULL round trip."""
    maxc, argmax = x.max(1)
    minc = x.min(1).values
    delta = maxc - minc
    safe = delta.clamp(min=1e-6)
    r, g, b = x.unbind(1)
    h = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6 % 1, 0.0)
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-6), 0.0)
    h = (h + turns.view(-1, 1, 1)) % 1 * 6
    k = torch.stack([(5 + h) % 6, (3 + h) % 6, (1 + h) % 6], 1)  # the HSV->RGB formula per channel
    weight = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return quantize(maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * weight))


def adjust(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """One colour-jitter op with per-crop `factor` [N] (torchvision semantics, as `augment.adjust`)."""
    f = factor.view(-1, 1, 1, 1)
    if op == BRIGHTNESS:
        return quantize(x * f)
    if op == CONTRAST:
        return quantize(x * f + (1 - f) * gray(x).mean((1, 2, 3), keepdim=True))
    if op == SATURATION:
        return quantize(x * f + (1 - f) * gray(x))
    return hue_shift(x, torch.round(factor * 256) % 256 / 256)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with per-crop `sigma` [N]; OpenCV's kernel size for uint8 (round(6 sigma + 1),
    odd) and its default border (reflect-101). Smaller kernels are zero-padded to the largest one."""
    sizes = (torch.round(sigma * 6 + 1).long() | 1).tolist()
    radius = max(sizes) // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    sig = sigma.float().view(-1, 1)
    kernel = torch.exp(-(offsets**2) / (2 * sig**2))
    kernel = kernel * (offsets.abs() <= torch.tensor(sizes).view(-1, 1) // 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.device)
    n, c, height, width = x.shape
    weight = kernel.repeat_interleave(c, 0)
    flat = F.pad(x.reshape(1, n * c, height, width), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, weight.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, weight.view(n * c, 1, -1, 1), groups=n * c)
    return quantize(flat.view(n, c, height, width))


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Indices (on `device`) of the rows where the host-side `mask` holds; None when there are none."""
    index = mask.nonzero().flatten()
    return index.to(device, non_blocking=True) if len(index) else None


def photometric(x: torch.Tensor, plans: torch.Tensor) -> torch.Tensor:
    """Apply flip, colour jitter (each crop in its own op order), grayscale, blur and solarise of the CPU
    plan table `plans` [N, PLAN_COLUMNS] to crops `x` [N, 3, S, S] (float 0..255), in the worker's order."""
    dev = x.device
    if (rows := _rows(plans[:, FLIP] > 0, dev)) is not None:
        x[rows] = x[rows].flip(-1)
    for step in range(4):
        ops, factors = plans[:, JITTER + 2 * step], plans[:, JITTER + 2 * step + 1]
        for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
            mask = ops == op
            if (rows := _rows(mask, dev)) is not None:
                x[rows] = adjust(x[rows], op, factors[mask].float().to(dev, non_blocking=True))
    if (rows := _rows(plans[:, GRAY] > 0, dev)) is not None:
        x[rows] = gray(x[rows]).expand(-1, 3, -1, -1)
    mask = plans[:, SIGMA] > 0
    if (rows := _rows(mask, dev)) is not None:
        x[rows] = gaussian_blur(x[rows], plans[mask, SIGMA])
    if (rows := _rows(plans[:, SOLARIZE] > 0, dev)) is not None:
        x[rows] = torch.where(x[rows] >= 128, 255 - x[rows], x[rows])
    return x
