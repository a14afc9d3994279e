"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' embeddings is pulled to the identity.

For global crops a, b: z = BN(projector(CLS_student(x))), each view normalised over the global batch (mean 0,
biased variance 1, no affine: the authors' `BatchNorm1d(affine=False)` after the projector, SyncBN over ranks),
    C = sum over ranks of z_a^T z_b / N   (N the global batch),
    L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2,   lambda = 5e-3.
The loss is the paper's formula; the authors' early code also multiplied it by a `scale-loss` factor (1/32),
which only rescales the learning rate of a scale-invariant optimiser and is left out. Projector: Linear-BN-ReLU,
Linear-BN-ReLU, Linear (no bias), 8192 wide at full size; its BNs and the output BN use the global batch
(`GlobalBatchNorm1d`). The cross-correlation is summed over ranks through a differentiable all-reduce, so every
rank holds the same loss and DDP's average gives the whole batch's gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from harmony.core.distributed import all_reduce_sum_with_grad, world_size
from harmony.models.heads import batchnorm_mlp
from harmony.objective_config import BarlowTwinsConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, StepInfo, register
from harmony.objectives.crop_pair import CropPairObjective


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    return matrix[~torch.eye(matrix.shape[0], dtype=torch.bool, device=matrix.device)]


def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor, global_batch: int) -> torch.Tensor:
    """C = sum over ranks of z_a^T z_b / N: z_* this rank's rows [B, D] of embeddings normalised over the global
    batch of N rows; the sum carries gradients to every rank."""
    return all_reduce_sum_with_grad(z_a.float().t() @ z_b.float() / global_batch)


def barlow_twins_loss(c: torch.Tensor, lambd: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, on-diagonal term, off-diagonal term) of the cross-correlation matrix `c` [D, D]."""
    on_diagonal = (1.0 - torch.diagonal(c)).pow(2).sum()
    off = off_diagonal(c).pow(2).sum()
    return on_diagonal + lambd * off, on_diagonal, off


@register
class BarlowTwinsObjective(CropPairObjective):
    """Barlow Twins between the student's two clean global crops (no teacher)."""

    key = "barlowtwins"

    def __init__(self, cfg: BarlowTwinsConfig, embed_dim: int) -> None:
        super().__init__(cfg)
        # the projector's last Linear followed by the loss's BatchNorm without affine: the authors' projector + bn
        self.projector = batchnorm_mlp(embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=3, output_norm="plain")

    def flop_parts(self) -> dict[str, list[nn.Module]]:
        return {"heads": [self.projector]}

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        z_a = self.projector(enc.clean[0][:, 0])  # each view its own BN statistics, as the authors' two calls
        z_b = self.projector(enc.clean[1][:, 0])
        c = cross_correlation(z_a, z_b, global_batch=z_a.shape[0] * world_size())  # every rank the same rows
        loss, on_diagonal, off = barlow_twins_loss(c, self.cfg.lambd)
        return LossOutput(loss, {"barlowtwins_on_diag": on_diagonal.detach(), "barlowtwins_off_diag": off.detach()})
