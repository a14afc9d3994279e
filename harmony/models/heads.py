"""Projection heads: the DINO/iBOT head, the SimCLR MLP and the cross-rank BatchNorm MLPs of SimSiam / MoCo v3."""

from __future__ import annotations

import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from harmony.models.global_batchnorm import GlobalBatchNorm1d


class NormalizedLinear(nn.Module):
    """Linear layer whose weight rows are L2-normalised at every call.

    Equivalent to `weight_norm` with the gain frozen at 1 (DINO's `norm_last_layer=True`), without
    parametrisation hooks, so EMA copies and state dicts stay plain tensors.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=-1))


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> L2 norm -> weight-normalised linear to `out_dim` logits."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class StandardizedLinear(nn.Linear):
    """Linear layer with weight standardisation (Qiao et al. 2019): each output's weight row is shifted to mean 0
    and scaled to variance 1 at every call, so the layer needs no batch statistics after it (with GroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=1, unbiased=False, keepdim=True)
        return F.linear(x, (self.weight - mean) * torch.rsqrt(var + 1e-5), self.bias)


class SimCLRProjector(nn.Module):
    """SimCLR's projector: (Linear-BN-ReLU) x (num_layers - 1), then Linear. Three layers in SLIP (as SimCLR v2),
    two in the SimCLR paper."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-1], out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def batchnorm_mlp(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, output_norm: Literal["plain", "none"]
) -> nn.Sequential:
    """SimSiam's / MoCo v3's heads: (Linear-BN-ReLU) x (num_layers - 1), then Linear, then a BN without learnt
    scale and shift (`plain`, as both authors' code) or none. The BNs are `GlobalBatchNorm1d` (statistics of the
    global batch, as the methods' SyncBN); a Linear followed by a BN has no bias (the BN removes it)."""
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1)
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b, bias=False), GlobalBatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], out_dim, bias=output_norm == "none"))
    if output_norm == "plain":
        layers.append(GlobalBatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
