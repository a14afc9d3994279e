"""Model architectures: named sizes, and the fields that describe any ViT or CLIP text tower Harmony builds
(an encoder started from another library's weights records its own architecture in `model.vision_arch` /
`model.text_arch`). Vision sizes with a timm name export to timm under that name. `model.vision=timm:NAME`
names a timm CNN instead (`CNNSize`, `cnn_size`): a pooled image tower without patch tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Activation = Literal["gelu", "quick_gelu"]
TextPool = Literal["eot", "first"]
CNN_PREFIX = "timm:"


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
    """A pre-LN text transformer; `act` as for `VisionSize`. CLIP's is causal and pooled at the end-of-text token;
    `causal=False, pool="first"` is a BERT-style bidirectional encoder pooled at its first token (the start-of-text
    token, ALIGN's [CLS]), which masks the padding out of its attention."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: Activation = "gelu"
    norm_eps: float = 1e-5
    causal: bool = True
    pool: TextPool = "eot"


@dataclass(frozen=True)
class CNNSize:
    """A timm CNN image tower: `timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)`, its
    globally pooled features the image feature (no class token, no patch tokens)."""

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


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
    # bidirectional, first-token pooled (BERT-like, pre-LN): ALIGN's text encoder
    "bert-tiny-test": TextSize(width=32, layers=2, heads=2, causal=False, pool="first"),
    "bert-tiny": TextSize(width=128, layers=4, heads=4, causal=False, pool="first"),
    "bert-small": TextSize(width=512, layers=4, heads=8, causal=False, pool="first"),
    "bert-base": TextSize(width=768, layers=12, heads=12, causal=False, pool="first"),
    "bert-large": TextSize(width=1024, layers=24, heads=16, causal=False, pool="first"),
}

# named CNNs that timm has no name for: `timm:resnet-tiny` is timm's ResNet-18 with one basic block per stage and
# widths 16-128 (324k parameters), for CPU runs
CNN_SIZES: dict[str, CNNSize] = {
    "resnet-tiny": CNNSize("resnet18", {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}),
}


def cnn_size(vision: str) -> CNNSize | None:
    """The CNN that `model.vision` names (`timm:NAME`: a size of `CNN_SIZES` or any timm model name), else None."""
    if not vision.startswith(CNN_PREFIX):
        return None
    name = vision[len(CNN_PREFIX) :]
    return CNN_SIZES.get(name) or CNNSize(name)
