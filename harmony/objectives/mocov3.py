"""MoCo v3: the queries of one view against the momentum keys of the other view, over the global batch.

For global crops a, b: q = normalize(predictor(projector(CLS_student(x)))), k = normalize(target_projector(
CLS_teacher(x))) (no gradient). With the keys of every rank gathered (k_all, N rows) and local row i positive
at global row rank*B + i,
    ctr(q, k) = 2 tau * CE(q k_all^T / tau, arange(B) + rank*B),    L = ctr(q_a, k_b) + ctr(q_b, k_a),
tau = 0.2 (Chen, Xie & He 2021). The key encoder is the task's EMA teacher (momentum from `teacher.*`) and
the EMA copy of the projector; the predictor has none. Projector: Linear-BN-ReLU, Linear-BN-ReLU,
Linear-BN (no affine); predictor: Linear-BN-ReLU, Linear-BN (no affine); BNs over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harmony.core.distributed import gather_no_grad, rank
from harmony.models.heads import batchnorm_mlp
from harmony.objective_config import MoCoV3Config
from harmony.objectives.base import Batch, Encoded, LossOutput, StepInfo, register
from harmony.objectives.target_projector import TargetProjectorObjective


def mocov3_contrast(q: torch.Tensor, k_all: torch.Tensor, temperature: float, offset: int) -> torch.Tensor:
    """q: local normalised queries [B, E]; k_all: normalised keys of every rank [N, E], no gradient; local row
    i is global row offset + i. InfoNCE scaled by 2 tau, as the paper (it keeps the gradient scale of tau)."""
    logits = q.float() @ k_all.detach().float().t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return 2.0 * temperature * F.cross_entropy(logits, labels)


def mocov3_loss(
    q_a: torch.Tensor, q_b: torch.Tensor, k_a_all: torch.Tensor, k_b_all: torch.Tensor, temperature: float, offset: int
) -> torch.Tensor:
    """Symmetric: view a's queries against view b's keys, plus b's queries against a's keys."""
    return mocov3_contrast(q_a, k_b_all, temperature, offset) + mocov3_contrast(q_b, k_a_all, temperature, offset)


@register
class MoCoV3Objective(TargetProjectorObjective):
    """MoCo v3 between the two clean global crops: student queries against EMA-teacher keys."""

    key = "mocov3"

    def __init__(self, cfg: MoCoV3Config, embed_dim: int) -> None:
        super().__init__(cfg)
        self.set_heads(
            batchnorm_mlp(embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=3, output_norm="plain"),
            batchnorm_mlp(cfg.out_dim, cfg.hidden_dim, cfg.out_dim, num_layers=2, output_norm="plain"),
        )

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        q_a = F.normalize(self.predictor(self.projector(enc.clean[0][:, 0])), dim=-1)
        q_b = F.normalize(self.predictor(self.projector(enc.clean[1][:, 0])), dim=-1)
        with torch.no_grad():
            k_a = gather_no_grad(F.normalize(self.target_projector(enc.teacher[0, :, 0]), dim=-1))
            k_b = gather_no_grad(F.normalize(self.target_projector(enc.teacher[1, :, 0]), dim=-1))
        offset = rank() * q_a.shape[0]
        return LossOutput(mocov3_loss(q_a, q_b, k_a, k_b, self.cfg.temperature, offset))
