"""Mask generators, run in the data pipeline so the training step needs no host-device sync.

- `block_mask`: iBOT's block-wise masking (blocks of >= `min_patches`, log-uniform aspect ratio,
  added until the ratio is reached).
- `ibot_ratio`: per crop, 0 with probability 1 - p, else U(min, max) ("0 or 0.3 +- 0.2").
- `random_split`: MAE's random subset of kept patches (a static count, so shapes are static).
- `patch_loss_weights` / `flat_index`: turn masks into flat token indices and per-token weights.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def ibot_ratio(rng: random.Random, probability: float, low: float, high: float) -> float:
    return rng.uniform(low, high) if rng.random() < probability else 0.0


def block_mask(
    grid: tuple[int, int], ratio: float, rng: random.Random, min_patches: int = 16, aspect_min: float = 0.3
) -> torch.Tensor:
    """Bool [gh, gw] with about `ratio` of the patches masked in rectangular blocks (never more).
    Built in numpy: per-block tensor indexing would cost more than the rest of the sample's masks."""
    gh, gw = grid
    mask = np.zeros((gh, gw), dtype=bool)
    target = round(ratio * gh * gw)
    log_aspect = (math.log(aspect_min), math.log(1 / aspect_min))
    count = 0
    while count < target:
        remaining = target - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min(min_patches, remaining), remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if not (0 < h < gh and 0 < w < gw):
                continue
            top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
            new = h * w - int(np.count_nonzero(mask[top : top + h, left : left + w]))
            if 0 < new <= remaining:
                mask[top : top + h, left : left + w] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return torch.from_numpy(mask)


def random_split(num_patches: int, keep: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, removed) sorted patch indices; `keep` patches chosen uniformly at random."""
    perm = torch.randperm(num_patches, generator=generator)
    return perm[:keep].sort().values, perm[keep:].sort().values


def num_kept(num_patches: int, keep_ratio: float) -> int:
    return max(1, int(num_patches * keep_ratio))


def flat_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of `mask` (row-major)."""
    return mask.flatten().nonzero().squeeze(1)


def patch_loss_weights(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """masks bool [G, B, N] -> (flat index of masked tokens, weight per masked token).

    weight = 1 / (masked tokens in its image x B x G): the iBOT patch loss averaged per image over its
    masked tokens, then over the B images of a crop (images without masks add 0), then over crops.
    """
    num_crops, batch = masks.shape[:2]
    per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
    weights = (masks.float() / (per_image * batch * num_crops)).flatten()
    index = flat_index(masks)
    return index, weights[index]
