"""SigLIP (Zhai et al. 2023): a sigmoid loss on every image-caption pair of the global batch.

L = -(1/N) sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)),  z_ij = +1 if i == j else -1,
t = exp(t') the model's learnable logit scale (t' init log 10), b a learnable bias (init -10), N the global batch.

Over K ranks each rank takes its B = N/K local image rows against every rank's captions, gathered with gradient,
and divides its sum by B. The rank average of the K local losses is then L (the logged loss). Gradients: the
gather's backward sums over ranks, so each rank's towers get their samples' share of d(sum_k L_k) = K dL, and
DDP's average over ranks divides by K again; t and b get each rank's dL_k, which DDP averages to dL. So K ranks
x B samples train exactly as 1 rank x N samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harmony.core.distributed import gather_with_grad, rank
from harmony.objective_config import SigLIPConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, Needs, Objective, StepInfo, register


def sigmoid_logits(
    image_local: torch.Tensor, text_all: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """t x_i . y_j + b for the local image rows [B, E] against every caption [N, E] -> [B, N]."""
    return scale * image_local @ text_all.t() + bias


def siglip_loss(logits: torch.Tensor, offset: int) -> torch.Tensor:
    """-(1/B) sum_ij log sigmoid(z_ij logits_ij) over B local rows; row i's caption is global column offset + i."""
    rows, columns = logits.shape
    row_ids = torch.arange(rows, device=logits.device) + offset
    matches = row_ids[:, None] == torch.arange(columns, device=logits.device)[None, :]
    signs = matches.float() * 2.0 - 1.0
    return -F.logsigmoid(signs * logits.float()).sum() / rows


@register
class SigLIPObjective(Objective):
    """Sigmoid image-text loss of the student's CLIP embeddings (crop 0 vs its caption) over the global batch,
    with the model's logit scale and a bias owned here."""

    key = "siglip"
    batch_coupled = True

    def __init__(self, cfg: SigLIPConfig) -> None:
        super().__init__(cfg)
        # shape [1], not a scalar: FSDP cannot shard 0-d parameters
        self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.logit_bias_init)))

    @classmethod
    def needs_for(cls, section: SigLIPConfig) -> Needs:
        return Needs(clean_crops={0}, text_clean=True, embeddings=True)

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        image = enc.image_embed
        logits = sigmoid_logits(image, gather_with_grad(enc.text_embed), enc.logit_scale, self.logit_bias)
        loss = siglip_loss(logits, offset=rank() * image.shape[0])
        metrics = {"logit_scale": enc.logit_scale.detach(), "logit_bias": self.logit_bias.detach().squeeze(0)}
        return LossOutput(loss, metrics)
