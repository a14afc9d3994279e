"""ViT image tower on timm's `VisionTransformer`, with the three forward modes pre-training needs.

- plain:        `tower(images)`
- iBOT-masked:  `tower(images, mask=bool[B, gh, gw])` replaces masked patch embeddings with a learned
                mask token; the sequence length is unchanged.
- MAE-dropped:  `tower(images, keep_index=long[B, K])` keeps only the listed patches (plus CLS).

Any input size works (the position table is interpolated), so 96 px local crops go through the
same module. The timm model lives at `self.vit`, so `self.vit.state_dict()` is a timm checkpoint.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from harmony.models.sizes import VISION_SIZES, VisionSize


def timm_kwargs(spec: VisionSize) -> dict[str, Any]:
    """The arguments of timm's `VisionTransformer` that build this architecture; timm's defaults are left
    implicit where the architecture uses them (so a named size builds exactly the modules it always did)."""
    kwargs: dict[str, Any] = {
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
    }
    if spec.mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = spec.mlp_ratio
    if spec.pre_norm:
        kwargs["pre_norm"] = True
    if spec.layer_scale is not None:
        kwargs["init_values"] = spec.layer_scale
    if spec.norm_eps != 1e-6:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=spec.norm_eps)
    if spec.act != "gelu":
        kwargs["act_layer"] = spec.act
    return kwargs


class VisionTower(nn.Module):
    """A timm ViT that returns all tokens and serves every pass the objectives ask for in one forward.

    `forward(images, mask=..., keep_index=...)`: with `mask` ([B, gh, gw] bool) the masked patches are
    replaced by a learned mask token before the position embedding (iBOT); with `keep_index` ([B, K])
    only those patches (plus CLS) enter the blocks (MAE / MaskCLIP). Inputs are normalised float images
    (`harmony.models.normalize`); any size that divides by the patch size works (positions are resampled).
    """

    def __init__(
        self,
        size: str | VisionSize,
        img_size: int = 224,
        drop_path_rate: float = 0.0,
        use_mask_token: bool = True,
        init: Literal["jax", "timm"] = "jax",
    ) -> None:
        super().__init__()
        spec = VISION_SIZES[size] if isinstance(size, str) else size
        self.spec = spec
        self.vit = VisionTransformer(
            img_size=img_size,
            num_classes=0,
            global_pool="token",
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            weight_init="jax" if init == "jax" else "",
            **timm_kwargs(spec),
        )
        self.embed_dim = spec.embed_dim
        self.patch_size = spec.patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim), requires_grad=use_mask_token)
        trunc_normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def disable_drop_path(self) -> None:
        """Stochastic depth off even in train mode (EMA teachers: DINO/iBOT build them without it)."""
        for module in self.modules():
            if isinstance(module, DropPath):
                module.drop_prob = 0.0

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The (interpolated) position table [1, 1 + gh * gw, D] for a patch grid, CLS row first."""
        return resample_abs_pos_embed(
            self.vit.pos_embed, new_size=grid, old_size=self.vit.patch_embed.grid_size, num_prefix_tokens=1
        )

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        keep_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised tokens [B, 1 + N, D] (CLS first); N counts only the kept patches when dropping."""
        vit = self.vit
        x = vit.patch_embed(images)  # [B, gh, gw, D]
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = vit._pos_embed(x)  # [B, 1 + N, D]
        if keep_index is not None:
            index = keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = torch.cat([x[:, :1], x[:, 1:].gather(1, index)], dim=1)
        x = vit.norm_pre(vit.patch_drop(x))
        if vit.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return vit.norm(x)
