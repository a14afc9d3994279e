"""Model architectures: named sizes, and the fields that describe any ViT or CLIP text tower Harmony builds
(an encoder started from another library's weights records its own architecture in `model.vision_arch` /
`model.text_arch`). Vision sizes with a timm name export to timm under that name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Activation = Literal["gelu", "quick_gelu"]


@dataclass(frozen=True)
class VisionSize:
    """A ViT (timm's `VisionTransformer` with a class token). `pre_norm`: a LayerNorm before the blocks and a
    patch embedding without bias (CLIP's `ln_pre`); `act`: the MLP's activation (OpenAI's CLIP uses QuickGELU);
    `layer_scale`: LayerScale's initial value (DINOv2), None for none; `norm_eps`: every LayerNorm's epsilon."""

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    timm_name: str | None = None
    mlp_ratio: float = 4.0
    pre_norm: bool = False
    act: Activation = "gelu"
    layer_scale: float | None = None
    norm_eps: float = 1e-6


@dataclass(frozen=True)
class TextSize:
    """A CLIP text transformer (pre-LN, causal, pooled at end-of-text); `act` as for `VisionSize`."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: Activation = "gelu"
    norm_eps: float = 1e-5


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
