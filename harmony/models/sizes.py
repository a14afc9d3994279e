"""Named model sizes. Vision sizes map to timm architectures so exported weights load in timm."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionSize:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    timm_name: str | None = None


@dataclass(frozen=True)
class TextSize:
    width: int
    layers: int
    heads: int


VISION_SIZES: dict[str, VisionSize] = {
    "tiny-test": VisionSize(patch_size=8, embed_dim=32, depth=2, num_heads=2),
    "tiny": VisionSize(patch_size=8, embed_dim=128, depth=4, num_heads=4),
    "vit-t16": VisionSize(16, 192, 12, 3, "vit_tiny_patch16_224"),
    "vit-s16": VisionSize(16, 384, 12, 6, "vit_small_patch16_224"),
    "vit-b16": VisionSize(16, 768, 12, 12, "vit_base_patch16_224"),
    "vit-l16": VisionSize(16, 1024, 24, 16, "vit_large_patch16_224"),
}

TEXT_SIZES: dict[str, TextSize] = {
    "tiny-test": TextSize(width=32, layers=2, heads=2),
    "tiny": TextSize(width=128, layers=4, heads=4),
    "clip-base": TextSize(width=512, layers=12, heads=8),
    "clip-large": TextSize(width=768, layers=12, heads=12),
}
