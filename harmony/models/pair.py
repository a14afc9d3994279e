"""The image-text pair: vision tower, optional text tower, CLIP projections and logit scale.

Students and EMA teachers are both instances of this class; evaluation and export load it too.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from harmony.core.distributed import local
from harmony.models.cnn import CNNTower
from harmony.models.sizes import CNNSize, TextSize, VisionSize
from harmony.models.text import TextTower
from harmony.models.vision import VisionTower


class ImageTextModel(nn.Module):
    def __init__(
        self,
        vision_size: str | VisionSize | CNNSize,
        text_size: str | TextSize | None,
        embed_dim: int,
        img_size: int,
        vocab_size: int,
        context_length: int,
        eot_id: int,
        drop_path_rate: float = 0.0,
        use_mask_token: bool = True,
        vision_init: Literal["jax", "timm"] = "jax",
        logit_scale_init: float = 1 / 0.07,
        logit_scale_max: float = 100.0,
    ) -> None:
        super().__init__()
        self.visual: VisionTower | CNNTower
        if isinstance(vision_size, CNNSize):
            self.visual = CNNTower(vision_size, img_size=img_size, drop_path_rate=drop_path_rate)
        else:
            self.visual = VisionTower(
                vision_size,
                img_size=img_size,
                drop_path_rate=drop_path_rate,
                use_mask_token=use_mask_token,
                init=vision_init,
            )
        self.logit_scale_max = logit_scale_max
        self.text: TextTower | None = None
        if text_size is not None:
            self.text = TextTower(text_size, vocab_size=vocab_size, context_length=context_length, eot_id=eot_id)
            self.visual_projection = nn.Linear(self.visual.embed_dim, embed_dim, bias=False)
            self.text_projection = nn.Parameter(torch.empty(self.text.width, embed_dim))
            # shape [1], not a scalar: FSDP cannot shard 0-d parameters
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(min(logit_scale_init, logit_scale_max))))
            nn.init.normal_(self.visual_projection.weight, std=self.visual.embed_dim**-0.5)
            nn.init.normal_(self.text_projection, std=self.text.width**-0.5)

    def vit(self) -> VisionTower:
        """The ViT image tower, for what reads its patch tokens or parts; ValueError for a CNN tower (none)."""
        if not isinstance(self.visual, VisionTower):
            raise ValueError("this model's image tower is a CNN: it has no patch tokens")
        return self.visual

    @property
    def has_text(self) -> bool:
        return self.text is not None

    def no_weight_decay(self) -> set[str]:
        names = {f"visual.{n}" for n in self.visual.no_weight_decay()}
        if self.text is not None:
            names |= {f"text.{n}" for n in self.text.no_weight_decay()} | {"logit_scale"}
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if self.text is not None:
            self.text.set_grad_checkpointing(enable)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) as a 0-d tensor. Not clamped here: a clamp in the forward pass has zero
        gradient above the cap, so the parameter could never come back down; `clamp_logit_scale` keeps
        the parameter itself at or below log(`logit_scale_max`) after every optimiser step instead."""
        return self.logit_scale.exp().squeeze(0)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp the parameter in place to [0, log(logit_scale_max)] (open_clip and SLIP do this after
        each optimiser step); a no-op without a text tower."""
        if self.text is not None:
            local(self.logit_scale.data).clamp_(0.0, math.log(self.logit_scale_max))

    def image_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised joint-space embedding from the CLS token of vision-tower output (a CNN's pooled feature)."""
        return F.normalize(self.visual_projection(tokens[:, 0]), dim=-1)

    def text_embedding(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        assert self.text is not None
        return F.normalize(self.text.pool(features, ids) @ self.text_projection, dim=-1)

    def image_token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised joint-space embedding of every patch token (CLS left out) of vision-tower output."""
        return F.normalize(self.visual_projection(tokens[:, 1:]), dim=-1)

    def text_token_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised joint-space embedding of every caption position of text-tower output (padding included)."""
        return F.normalize(features @ self.text_projection, dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_embedding(self.visual(images))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.text is not None, "this model has no text tower"
        return self.text_embedding(self.text(ids), ids)
