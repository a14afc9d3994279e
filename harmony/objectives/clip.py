"""CLIP image-text contrast with hard targets and Harmony's soft targets from the EMA teachers.

L_hard = 1/2 [CE(I, softmax L) + CE(I, softmax L^T)],  L = s * Z_img Z_txt^T
L_soft = 1/2 [CE(P_i2t, softmax L) + CE(P_t2i, softmax L^T)],  P_i2t = softmax(Zt_img Zt_txt^T / tau)
L_clip = alpha * L_hard + (1 - alpha) * L_soft,  alpha: 1 -> 0.2 (cosine over the first epochs, per step)

Rows are the local batch; columns are gathered from every rank (with gradient for the student).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harmony.core.distributed import gather_no_grad, gather_with_grad, rank
from harmony.core.ramps import cosine_ramp
from harmony.objective_config import ClipConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, Needs, Objective, StepInfo, register
from harmony.objectives.centering import soft_cross_entropy


def contrastive_logits(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_per_image [B, N], logits_per_text [B, N]): local rows against global columns."""
    return scale * image_local @ text_all.t(), scale * text_local @ image_all.t()


def clip_hard_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, offset: int) -> torch.Tensor:
    """Symmetric InfoNCE; local row i is paired with global column offset + i."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device) + offset
    return 0.5 * (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels))


def hard_contrast(enc: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits_per_image, logits_per_text, L_hard) of the student's embeddings: local rows against the columns of
    every rank, gathered with gradient."""
    image, text = enc.image_embed, enc.text_embed
    lpi, lpt = contrastive_logits(image, text, gather_with_grad(image), gather_with_grad(text), enc.logit_scale)
    return lpi, lpt, clip_hard_loss(lpi, lpt, offset=rank() * image.shape[0])


def soft_targets(
    teacher_image_local: torch.Tensor,
    teacher_text_local: torch.Tensor,
    teacher_image_all: torch.Tensor,
    teacher_text_all: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_i2t, P_t2i) from the teachers' normalised embeddings."""
    p_i2t = F.softmax(teacher_image_local.float() @ teacher_text_all.float().t() / temperature, dim=-1)
    p_t2i = F.softmax(teacher_text_local.float() @ teacher_image_all.float().t() / temperature, dim=-1)
    return p_i2t, p_t2i


def clip_soft_loss(
    logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, p_i2t: torch.Tensor, p_t2i: torch.Tensor
) -> torch.Tensor:
    return 0.5 * (
        soft_cross_entropy(p_i2t, logits_per_image).mean() + soft_cross_entropy(p_t2i, logits_per_text).mean()
    )


@register
class ClipObjective(Objective):
    """Image-text contrast of the student's CLIP embeddings (crop 0 vs its caption), optionally mixed
    with soft targets from the EMA teachers' embeddings (`alpha` ramps hard -> soft)."""

    key = "clip"
    batch_coupled = True

    @classmethod
    def needs_for(cls, section: ClipConfig) -> Needs:
        soft = section.soft_targets
        return Needs(
            clean_crops={0}, text_clean=True, teacher_crops={0} if soft else set(), teacher_text=soft, embeddings=True
        )

    def alpha(self, step: StepInfo) -> float:
        if not self.cfg.soft_targets:
            return 1.0
        return cosine_ramp(self.cfg.alpha_start, self.cfg.alpha_end, step.epoch / max(self.cfg.alpha_epochs, 1e-12))

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        lpi, lpt, hard = hard_contrast(enc)
        metrics = {"clip_hard": hard.detach(), "logit_scale": enc.logit_scale.detach()}
        alpha = self.alpha(step)
        if not self.cfg.soft_targets:
            return LossOutput(hard, metrics)
        t_img, t_txt = enc.teacher_image_embed, enc.teacher_text_embed
        p_i2t, p_t2i = soft_targets(
            t_img, t_txt, gather_no_grad(t_img), gather_no_grad(t_txt), self.cfg.soft_temperature
        )
        soft = clip_soft_loss(lpi, lpt, p_i2t, p_t2i)
        metrics |= {"clip_soft": soft.detach(), "clip_alpha": torch.tensor(alpha)}
        return LossOutput(alpha * hard + (1.0 - alpha) * soft, metrics)
