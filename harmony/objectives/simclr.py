"""SimCLR (NT-Xent) between the two global crops: SLIP's image self-supervision, and the image-only `simclr`
method (Chen et al. 2020).

For view a: logits against every gathered b (positive at the own index) and every other gathered a
(own index excluded); symmetric for b; L = 1/2 (CE_a + CE_b), temperature 0.1. The projector has
`num_layers` linear layers (SLIP: 3; the SimCLR paper: 2, to 128 dimensions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harmony.core.distributed import gather_with_grad, rank
from harmony.models.heads import SimCLRProjector
from harmony.objective_config import SimCLRConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, StepInfo, register
from harmony.objectives.crop_pair import CropPairObjective


def simclr_loss(
    q_a: torch.Tensor, q_b: torch.Tensor, k_a: torch.Tensor, k_b: torch.Tensor, temperature: float, offset: int
) -> torch.Tensor:
    """q_*: local normalised embeddings [B, E]; k_*: gathered [N, E]; local row i is global row offset + i."""
    labels = torch.arange(q_a.shape[0], device=q_a.device) + offset
    self_mask = F.one_hot(labels, k_a.shape[0]).bool()
    logits_aa = (q_a @ k_a.t() / temperature).float().masked_fill(self_mask, float("-inf"))
    logits_bb = (q_b @ k_b.t() / temperature).float().masked_fill(self_mask, float("-inf"))
    logits_ab = (q_a @ k_b.t() / temperature).float()
    logits_ba = (q_b @ k_a.t() / temperature).float()
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return 0.5 * (loss_a + loss_b)


@register
class SimCLRObjective(CropPairObjective):
    """SimCLR: NT-Xent between the projected CLS tokens of the two clean global crops."""

    key = "simclr"

    def __init__(self, cfg: SimCLRConfig, embed_dim: int) -> None:
        super().__init__(cfg)
        self.projector = SimCLRProjector(embed_dim, cfg.hidden_dim, cfg.out_dim, cfg.num_layers)

    def flop_parts(self) -> dict[str, list[torch.nn.Module]]:
        return {"heads": [self.projector]}

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        q_a = F.normalize(self.projector(enc.clean[0][:, 0]), dim=-1)
        q_b = F.normalize(self.projector(enc.clean[1][:, 0]), dim=-1)
        k_a, k_b = gather_with_grad(q_a), gather_with_grad(q_b)
        return LossOutput(simclr_loss(q_a, q_b, k_a, k_b, self.cfg.temperature, offset=rank() * q_a.shape[0]))
