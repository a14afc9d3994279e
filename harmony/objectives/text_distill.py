"""Text self-distillation: iBOT's patch loss on caption tokens.

Teacher text tower + head on the clean caption; student on the masked caption (the MLM forward is
reused). Per-token CE between the centred/sharpened teacher distribution and the student's, over the
masked tokens, averaged per caption over its masked tokens, then over captions (a caption without a
masked token counts 0), as iBOT's patch loss does per image. With equal per-rank batches DDP's gradient
averaging makes this the mean over the global batch's captions. The centre is an EMA of raw teacher
logits of real (non-padding) tokens only (the authors' code centred probabilities, padding included).
"""

from __future__ import annotations

import torch

from harmony.objective_config import TextDistillConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, ModelDims, Needs, StepInfo, register
from harmony.objectives.centering import Center, mean_entropy, sharpen, soft_cross_entropy
from harmony.objectives.distill import SelfDistillation


def text_distill_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float, token_weight: torch.Tensor
) -> torch.Tensor:
    """Masked-token CE weighted by `token_weight` = 1 / (masked tokens in its caption x B), so the sum is
    the mean over captions of each caption's mean CE (`collate`'s `text_distill_weight`)."""
    return (soft_cross_entropy(teacher_probs, student_logits, student_temp) * token_weight).sum()


@register
class TextDistillObjective(SelfDistillation):
    """Per-token self-distillation of captions: the student head on the masked caption matches the EMA
    teacher head's centred, sharpened distribution on the clean one, at the masked tokens."""

    key = "text_distill"

    def __init__(self, cfg: TextDistillConfig, text_width: int) -> None:
        super().__init__(cfg)
        self.make_heads(text_width, cfg.head)
        self.center = Center(cfg.head.out_dim, cfg.center_momentum)

    @classmethod
    def needs_for(cls, section: TextDistillConfig) -> Needs:
        return Needs(text_masked=True, teacher_text=True, text_mask_prob=section.mask_prob)

    @classmethod
    def build(cls, section: TextDistillConfig, dims: ModelDims) -> TextDistillObjective:
        return cls(section, dims.text_width)

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        index = batch["mlm_index"]
        student = self.student_head(enc.text_masked.flatten(0, 1)[index])
        with torch.no_grad():
            teacher_real = self.teacher_head(enc.teacher_text.flatten(0, 1)[batch["text_real_index"]])
            probs = sharpen(teacher_real[batch["mlm_in_real"]], self.center.value, self.teacher_temperature(step))
            self.center.observe(teacher_real)
        loss = text_distill_loss(student, probs, self.cfg.student_temp, batch["text_distill_weight"])
        return LossOutput(loss, {"text_distill_target_entropy": mean_entropy(probs)})
