"""SimSiam: a predictor on one view regresses the other view's projection, held fixed by a stop-gradient.

For global crops a, b: z = projector(CLS_student(x)), p = predictor(z), D(p, z) = -cos(p, sg(z)),
    L = 1/2 D(p_a, z_b) + 1/2 D(p_b, z_a)
(Chen & He 2021). Both branches are the student: no EMA teacher, the stop-gradient alone prevents collapse.
Projector: 3 layers Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN (no learnt scale and shift, as the authors' code);
predictor: the bottleneck Linear-BN-ReLU-Linear.
The BNs use the global batch (`GlobalBatchNorm1d`), as the paper's SyncBN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harmony.models.heads import batchnorm_mlp
from harmony.objective_config import SimSiamConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, StepInfo, register
from harmony.objectives.crop_pair import CropPairObjective


def simsiam_loss(p_a: torch.Tensor, p_b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """p_*: predictions [B, E]; z_*: projections [B, E], stop-gradient applied here; symmetric negative cosine."""

    def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()

    return 0.5 * negative_cosine(p_a, z_b) + 0.5 * negative_cosine(p_b, z_a)


def output_std(z: torch.Tensor) -> torch.Tensor:
    """The paper's collapse monitor: per-channel std over the batch of the L2-normalised projections, averaged;
    0 when collapsed, about 1/sqrt(E) for well-spread outputs."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()


@register
class SimSiamObjective(CropPairObjective):
    """SimSiam between the two clean global crops of the student; no teacher."""

    key = "simsiam"

    def __init__(self, cfg: SimSiamConfig, embed_dim: int) -> None:
        super().__init__(cfg)
        self.projector = batchnorm_mlp(embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=3, output_norm="plain")
        self.predictor = batchnorm_mlp(
            cfg.out_dim, cfg.predictor_hidden_dim, cfg.out_dim, num_layers=2, output_norm="none"
        )

    def flop_parts(self) -> dict[str, list[nn.Module]]:
        return {"heads": [self.projector, self.predictor]}

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        z_a = self.projector(enc.clean[0][:, 0])  # each view's own BN statistics, as the paper's two passes
        z_b = self.projector(enc.clean[1][:, 0])
        p_a, p_b = self.predictor(z_a), self.predictor(z_b)
        return LossOutput(simsiam_loss(p_a, p_b, z_a, z_b), {"simsiam_output_std": output_std(z_a)})
