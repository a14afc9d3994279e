"""BYOL: an online projector + predictor regress the EMA target network's projection of the other view.

For global crops a, b: z = projector(CLS_student(x)), p = predictor(z), z' = target_projector(CLS_teacher(x)),
    L = mean_b [2 - 2 cos(p_a, sg(z'_b))] + mean_b [2 - 2 cos(p_b, sg(z'_a))]
(the paper's symmetrised loss). The target tower is the task's EMA teacher (momentum from `teacher.*`),
the target projector the EMA copy of the online one; the predictor has no target copy. `norm` gives the
lecture's ablations of the heads: without BatchNorm, or with GroupNorm and weight standardisation.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from harmony.models.heads import StandardizedLinear
from harmony.objective_config import BYOLConfig
from harmony.objective_config.sections import BYOL_GROUPS
from harmony.objectives.base import Batch, Encoded, LossOutput, StepInfo, register
from harmony.objectives.target_projector import TargetProjectorObjective


def byol_loss(p_a: torch.Tensor, p_b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """p_*: online predictions [B, E]; z_*: target projections [B, E] (no gradient); symmetric 2 - 2 cos."""

    def term(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (2.0 - 2.0 * F.cosine_similarity(p.float(), z.float(), dim=-1)).mean()

    return term(p_a, z_b) + term(p_b, z_a)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, norm: Literal["bn", "none", "gn_ws"] = "bn") -> nn.Sequential:
    """BYOL's projector/predictor: Linear - BatchNorm - ReLU - Linear (`bn`, the paper's); without the BatchNorm
    (`none`); or with a weight-standardised first Linear and GroupNorm in place of the BatchNorm (`gn_ws`)."""
    if norm == "none":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
    if norm == "gn_ws":
        return nn.Sequential(
            StandardizedLinear(in_dim, hidden_dim),
            nn.GroupNorm(BYOL_GROUPS, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


@register
class BYOLObjective(TargetProjectorObjective):
    """BYOL between the two clean global crops: online projector + predictor against the EMA target."""

    key = "byol"

    def __init__(self, cfg: BYOLConfig, embed_dim: int) -> None:
        super().__init__(cfg)
        self.set_heads(
            mlp(embed_dim, cfg.hidden_dim, cfg.out_dim, cfg.norm),
            mlp(cfg.out_dim, cfg.hidden_dim, cfg.out_dim, cfg.norm),
        )

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        p_a = self.predictor(self.projector(enc.clean[0][:, 0]))
        p_b = self.predictor(self.projector(enc.clean[1][:, 0]))
        with torch.no_grad():
            z_a = self.target_projector(enc.teacher[0, :, 0])
            z_b = self.target_projector(enc.teacher[1, :, 0])
        return LossOutput(byol_loss(p_a, p_b, z_a, z_b))
