"""A timm CNN as the image tower (`model.vision=timm:NAME`): ResNet, ConvNeXt, EfficientNet, ... or
`timm:resnet-tiny` (`harmony.models.sizes.CNN_SIZES`), built with `pretrained=False` (nothing is downloaded) and
`num_classes=0`, so its output is the globally pooled feature.

`forward(images)` returns [B, 1, D]: the pooled feature where a ViT has its class token, and no patch tokens. Every
objective that reads only that row (CLIP, SigLIP, SimCLR, BYOL, SimSiam, MoCo v3, DINO, the joint-space embedding)
runs on it unchanged; the objectives that read patch tokens (iBOT's patch loss, MAE, MaskCLIP, FLIP) are refused
before a model is built (`harmony.objectives.registry.check_image_tower`). Any input size works (global pooling),
so DINO's local crops go through the same module. The timm model lives at `self.net`, so `self.net.state_dict()`
is a timm checkpoint.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import DropPath
from torch import nn

from harmony.models.sizes import CNN_PREFIX, CNNSize


def create_cnn(spec: CNNSize, drop_path_rate: float = 0.0) -> nn.Module:
    """timm's model for `spec`, random weights, classifier removed; ValueError for a name timm does not know or a
    model that is not a CNN (a ViT has patch tokens: name a Harmony size instead)."""
    name = spec.timm_name
    if not timm.is_model(name):
        raise ValueError(f"timm has no model '{name}' (timm.list_models() lists them)")
    kwargs = dict(spec.kwargs)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if hasattr(net, "patch_embed"):
        raise ValueError(
            f"'{CNN_PREFIX}{name}' is a transformer, not a CNN: use a Harmony ViT size (model.vision=vit-b16) or "
            f"start from its weights (--init {CNN_PREFIX}{name}:FILE)"
        )
    return net


def cnn_width(spec: CNNSize) -> int:
    """The pooled feature's width, from the architecture alone (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return _num_features(create_cnn(spec))


def _num_features(net: nn.Module) -> int:
    width = net.num_features
    if not isinstance(width, int):
        raise ValueError(f"timm's {type(net).__name__} does not say its pooled feature width (num_features)")
    return width


class CNNTower(nn.Module):
    """A timm CNN returning its pooled feature as a one-token sequence [B, 1, D] (module doc)."""

    patch_size = 1  # any input side works; there is no patch grid

    def __init__(self, spec: CNNSize, img_size: int = 224, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.spec = spec
        self.img_size = img_size  # the training resolution (exports record it as the preprocessing size)
        self.net = create_cnn(spec, drop_path_rate)
        self.embed_dim = _num_features(self.net)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        switch = self.net.set_grad_checkpointing
        assert callable(switch)
        switch(enable)

    def disable_drop_path(self) -> None:
        """Stochastic depth off even in train mode (EMA teachers)."""
        for module in self.modules():
            if isinstance(module, DropPath):
                module.drop_prob = 0.0

    def no_weight_decay(self) -> set[str]:
        return set()

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """No patch grid: a CNN tower has no patch tokens."""
        return (0, 0)

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, keep_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The pooled feature [B, 1, D]; masks and dropped patches need patch tokens, which a CNN has not."""
        if mask is not None or keep_index is not None:
            raise ValueError("a CNN image tower has no patch tokens to mask or drop")
        return self.net(images).unsqueeze(1)
