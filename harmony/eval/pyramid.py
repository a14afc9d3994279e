"""A plain ViT as a multi-scale backbone for dense tasks (BEiT/iBOT's recipe, used by the paper).

Outputs of four blocks (4/6/8/12 of 12, the same fractions of other depths) become maps at strides
p/4, p/2, p and 2p (two deconvolutions, one deconvolution, identity, max-pooling), then torchvision's
`FeaturePyramidNetwork` gives every level `out_channels` channels (and an extra max-pooled level for
Mask R-CNN's RPN when asked).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from harmony.models.vision import VisionTower


def pyramid_layers(depth: int) -> list[int]:
    """Block indices (0-based) feeding the four levels: blocks 4, 6, 8, 12 of a 12-block ViT."""
    return [max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1.0)]


def _deconv(dim: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)


class SimpleFeaturePyramid(nn.Module):
    """ViT -> OrderedDict '0'..'3' (strides p/4 .. 2p), plus 'pool' (4p) with `extra_level`."""

    def __init__(self, visual: VisionTower, out_channels: int = 256, extra_level: bool = False) -> None:
        super().__init__()
        self.vit: VisionTransformer = _trainable_copy(visual)
        dim, p = visual.embed_dim, visual.patch_size
        self.layers = pyramid_layers(len(self.vit.blocks))
        self.scales = nn.ModuleList(
            [
                nn.Sequential(_deconv(dim), nn.BatchNorm2d(dim), nn.GELU(), _deconv(dim)),
                _deconv(dim),
                nn.Identity(),
                nn.MaxPool2d(kernel_size=2, stride=2),
            ]
        )
        self.fpn = FeaturePyramidNetwork(
            [dim] * 4, out_channels, extra_blocks=LastLevelMaxPool() if extra_level else None
        )
        self.out_channels = out_channels
        self.strides = [p / 4, p / 2, p, 2 * p] + ([4 * p] if extra_level else [])

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        unique = sorted(set(self.layers))
        maps = self.vit.forward_intermediates(images, indices=unique, output_fmt="NCHW", intermediates_only=True)
        by_block = dict(zip(unique, maps))
        levels = OrderedDict(
            (str(i), scale(by_block[layer])) for i, (layer, scale) in enumerate(zip(self.layers, self.scales))
        )
        return self.fpn(levels)


def _trainable_copy(visual: VisionTower) -> VisionTransformer:
    """A deep copy of the tower's timm ViT with gradients on (the loaded model stays frozen)."""
    vit = copy.deepcopy(visual.vit)
    vit.requires_grad_(True)
    return vit
