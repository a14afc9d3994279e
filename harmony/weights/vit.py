"""A source's vision tower as a timm `VisionTransformer`: its architecture in Harmony's terms (`VisionSize`),
and what cannot be mapped refused by name. Every vision source (timm, open_clip, Hugging Face CLIP, the
DINO / iBOT / DINOv2 / MAE checkpoints) is read through a timm ViT of its architecture, so the tower loads
the same names Harmony trains under (`visual.vit.*`)."""

from __future__ import annotations

import math
import re
from typing import Any

import timm
import torch
from timm.layers import LayerScale, Mlp, PatchEmbed, QuickGELU
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from harmony.core.errors import CheckpointError
from harmony.models.sizes import VisionSize
from harmony.weights.source import State


def meta_vit(name: str | None = None, what: str = "", **kwargs: Any) -> VisionTransformer:
    """A timm ViT (by name, or `VisionTransformer(**kwargs)`) on the meta device: its architecture, no weights;
    `what` names the source in errors."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs) if name else VisionTransformer(**kwargs)
    if not isinstance(model, VisionTransformer):
        where = f"{what}: " if what else ""
        raise CheckpointError(
            f"{where}timm model '{name}' is a {type(model).__name__}, not a ViT; Harmony's towers are ViTs"
        )
    return model


def vision_size_of(vit: VisionTransformer, what: str, timm_name: str | None = None) -> VisionSize:
    """The architecture of a timm ViT in Harmony's terms; a feature Harmony's tower does not have is a
    one-line CheckpointError naming it (never loaded into a different architecture)."""

    def refuse(feature: str) -> None:
        raise CheckpointError(f"{what}: {feature}, which Harmony's vision tower does not have; it cannot be used")

    if getattr(vit, "num_reg_tokens", 0):
        refuse(f"its ViT has {vit.num_reg_tokens} register tokens")
    if vit.cls_token is None or getattr(vit, "no_embed_class", False):
        refuse("its ViT has no class token with a position of its own")
    if vit.pos_embed is None:
        refuse("its ViT has no learnt absolute position table")
    if not isinstance(vit.patch_embed, PatchEmbed) or vit.patch_embed.patch_size[0] != vit.patch_embed.patch_size[1]:
        refuse("its patch embedding is not a square convolution")
    block: Any = vit.blocks[0]  # timm's Block (typed as Module by nn.Sequential)
    attn, mlp = block.attn, block.mlp
    if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity) or attn.qkv.bias is None:
        refuse("its attention normalises queries and keys or has no bias")
    if not isinstance(mlp, Mlp) or not isinstance(mlp.fc1, nn.Linear):
        refuse(f"its MLP is a {type(mlp).__name__} (Harmony's is Linear-activation-Linear)")
    if not all(isinstance(n, nn.LayerNorm) for n in (block.norm1, block.norm2, vit.norm)):
        refuse("its blocks normalise with something other than LayerNorm")
    if isinstance(mlp.act, QuickGELU):
        act = "quick_gelu"
    elif isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none":
        act = "gelu"
    else:
        refuse(f"its MLP activation is {type(mlp.act).__name__}")
    pre_norm = isinstance(vit.norm_pre, nn.LayerNorm)
    if (vit.patch_embed.proj.bias is None) != pre_norm:
        refuse(
            "its patch embedding's bias does not follow timm's convention (none exactly with a LayerNorm before the blocks)"
        )
    embed_dim = int(vit.embed_dim)
    return VisionSize(
        patch_size=int(vit.patch_embed.patch_size[0]),
        embed_dim=embed_dim,
        depth=len(vit.blocks),
        num_heads=int(attn.num_heads),
        timm_name=timm_name,
        mlp_ratio=mlp.fc1.out_features / embed_dim,
        pre_norm=pre_norm,
        act=act,  # type: ignore[arg-type]
        layer_scale=1e-5 if isinstance(block.ls1, LayerScale) else None,
        norm_eps=float(getattr(vit.norm, "eps", 1e-6)),
    )


def image_size_of(vit: VisionTransformer) -> int:
    height, width = vit.patch_embed.img_size
    if height != width:
        raise CheckpointError(f"its position table is for {height}x{width} images; Harmony trains square crops")
    return int(height)


def inferred_vit(state: State, what: str) -> VisionTransformer:
    """A timm ViT (on the meta device) of the architecture the shapes of a timm-named state dict imply, with
    ViTs' 64 channels per attention head (DINO, iBOT, DINOv2 and MAE's ViT-S/B/L/g): for the official
    checkpoints, which hold weights but no architecture."""
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{what}: no ViT found (no pos_embed / patch_embed.proj.weight)")
    embed_dim, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    positions = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise CheckpointError(f"{what}: a position table of {positions} patches is not a square grid")
    kwargs: dict[str, Any] = {
        "img_size": grid * patch,
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": max(embed_dim // 64, 1),
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        "num_classes": 0,
    }
    if "blocks.0.ls1.gamma" in state:
        kwargs["init_values"] = 1e-5
    return meta_vit(**kwargs)


def resample_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A [1, 1 + g*g, D] position table (CLS row first) resampled to `grid` x `grid` patches (timm's bicubic)."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(table, new_size=(grid, grid), num_prefix_tokens=1)
