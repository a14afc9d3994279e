"""VICReg (Bardes, Ponce & LeCun 2021): invariance, variance and covariance terms on the two views' embeddings.

For global crops a, b: z = expander(CLS_student(x)) [B, D]; with Z the rows of every rank (N, gathered with
gradient, as the authors' `FullGatherLayer`) and Zc = Z - mean(Z),
    inv = mean over this rank's rows and dimensions of (z_a - z_b)^2            (the authors' `F.mse_loss`),
    var = 1/2 mean_d relu(gamma - sqrt(Var(Zc_a)_d + eps)) + the same for b       (unbiased variance),
    cov = 1/D sum_{i != j} (Zc_a^T Zc_a / (N - 1))_ij^2 + the same for b,
    L = 25 inv + 25 var + 1 cov,    gamma = 1, eps = 1e-4.
Expander: Linear-BN-ReLU, Linear-BN-ReLU, Linear without bias (8192-8192-8192 at full size); its BNs use the
global batch (the authors' SyncBN). No teacher. The gather's backward sums over ranks and DDP averages, so K ranks
x B rows train as 1 rank x KB rows; the invariance term is local, and DDP's average makes it the global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harmony.core.distributed import gather_with_grad
from harmony.models.heads import batchnorm_mlp
from harmony.objective_config import VICRegConfig
from harmony.objectives.barlowtwins import off_diagonal
from harmony.objectives.base import Batch, Encoded, LossOutput, StepInfo, register
from harmony.objectives.crop_pair import CropPairObjective


def variance_term(z_all: torch.Tensor, target: float, epsilon: float) -> torch.Tensor:
    """mean_d relu(target - sqrt(Var(z)_d + epsilon)) over the rows of every rank [N, D] (unbiased variance)."""
    return F.relu(target - torch.sqrt(z_all.var(dim=0) + epsilon)).mean()


def covariance_term(z_all: torch.Tensor) -> torch.Tensor:
    """1/D sum of the squared off-diagonal entries of the covariance of the rows of every rank [N, D]."""
    centred = z_all - z_all.mean(dim=0)
    cov = centred.t() @ centred / (z_all.shape[0] - 1)
    return off_diagonal(cov).pow(2).sum() / z_all.shape[1]


def vicreg_terms(
    z_a: torch.Tensor, z_b: torch.Tensor, z_a_all: torch.Tensor, z_b_all: torch.Tensor, cfg: VICRegConfig
) -> dict[str, torch.Tensor]:
    """{invariance, variance, covariance} of this rank's rows z_* [B, D] and every rank's z_*_all [N, D]."""
    z_a, z_b, z_a_all, z_b_all = (z.float() for z in (z_a, z_b, z_a_all, z_b_all))
    return {
        "invariance": F.mse_loss(z_a, z_b),
        "variance": 0.5 * variance_term(z_a_all, cfg.variance_target, cfg.epsilon)
        + 0.5 * variance_term(z_b_all, cfg.variance_target, cfg.epsilon),
        "covariance": covariance_term(z_a_all) + covariance_term(z_b_all),
    }


def vicreg_loss(terms: dict[str, torch.Tensor], cfg: VICRegConfig) -> torch.Tensor:
    """The weighted sum of the three terms."""
    return (
        cfg.invariance_weight * terms["invariance"]
        + cfg.variance_weight * terms["variance"]
        + cfg.covariance_weight * terms["covariance"]
    )


@register
class VICRegObjective(CropPairObjective):
    """VICReg between the student's two clean global crops (no teacher)."""

    key = "vicreg"

    def __init__(self, cfg: VICRegConfig, embed_dim: int) -> None:
        super().__init__(cfg)
        # the authors' expander ends in a Linear without bias and without BatchNorm: drop the plain output BN
        self.expander = batchnorm_mlp(embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=3, output_norm="plain")[:-1]

    def flop_parts(self) -> dict[str, list[nn.Module]]:
        return {"heads": [self.expander]}

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        z_a = self.expander(enc.clean[0][:, 0])  # each view its own BN statistics, as the authors' two calls
        z_b = self.expander(enc.clean[1][:, 0])
        terms = vicreg_terms(z_a, z_b, gather_with_grad(z_a), gather_with_grad(z_b), self.cfg)
        return LossOutput(vicreg_loss(terms, self.cfg), {f"vicreg_{k}": v.detach() for k, v in terms.items()})
