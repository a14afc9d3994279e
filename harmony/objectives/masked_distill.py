"""MaskCLIP's masked self-distillation (as reproduced in the Harmony paper, Appendix C).

The student encodes 25 % of the patches of the image; a 1-block decoder at the encoder's width puts
mask tokens at the removed positions and predicts features there; student and EMA-teacher iBOT-style
heads map them to distributions; loss = CE(softmax((t - c) / tau_t), log_softmax(s / tau_s)) over
the removed patches, with the teacher reading the full image.
"""

from __future__ import annotations

import torch

from harmony.models.decoders import MaskedFeatureDecoder
from harmony.objective_config import HeadConfig, MaskedDistillConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, Needs, StepInfo, register
from harmony.objectives.centering import Center, sharpen, soft_cross_entropy
from harmony.objectives.distill import SelfDistillation


def masked_distill_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean over removed patches of CE(teacher, student)."""
    return soft_cross_entropy(teacher_probs, student_logits, student_temp).mean()


@register
class MaskedDistillObjective(SelfDistillation):
    """MaskCLIP's masked self-distillation: a small decoder over the student's kept patches predicts, at
    the removed ones, the EMA teacher head's distribution on the full image."""

    key = "masked_distill"

    def __init__(self, cfg: MaskedDistillConfig, head: HeadConfig, dim: int) -> None:
        super().__init__(cfg)
        if dim % cfg.decoder_heads:
            raise ValueError(
                f"objectives.masked_distill.decoder_heads={cfg.decoder_heads} does not divide the width {dim}"
            )
        self.decoder = MaskedFeatureDecoder(dim, cfg.decoder_depth, cfg.decoder_heads)
        self.make_heads(dim, head)
        self.center = Center(head.out_dim, cfg.center_momentum)

    @classmethod
    def needs_for(cls, section: MaskedDistillConfig) -> Needs:
        return Needs(dropped_crops={0}, keep_ratio=section.keep_ratio, teacher_crops={0})

    def flop_parts(self) -> dict[str, list[torch.nn.Module]]:
        decoder: list[torch.nn.Module] = [self.decoder]
        return {"MaskCLIP decoder": decoder} | super().flop_parts()

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        gh, gw = enc.grid
        keep, remove = batch["mae_keep"][0], batch["mae_remove"][0]
        features = self.decoder(enc.dropped[0], keep, gh * gw, enc.pos_embed)
        removed = features.gather(1, remove.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        student = self.student_head(removed.flatten(0, 1))
        with torch.no_grad():
            t_tokens = enc.teacher[0, :, 1:].gather(1, remove.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
            t_logits = self.teacher_head(t_tokens.flatten(0, 1))
            probs = sharpen(t_logits, self.center.value, self.teacher_temperature(step))
            self.center.observe(t_logits)
        return LossOutput(masked_distill_loss(student, probs, self.cfg.student_temp))
