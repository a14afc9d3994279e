"""FLIP (Li et al. 2023): CLIP whose image tower sees only a random part of the patches during training.

In training, crop 0 keeps a random (1 - mask_ratio) of its patches (MAE-style dropping, the task's
patch-dropped pass; no mask tokens); the image embedding comes from that pass and the loss is CLIP's hard loss,
L = 1/2 [CE(I, softmax L) + CE(I, softmax L^T)],  L = s * Z_img Z_txt^T  (see `harmony.objectives.clip`),
local rows against columns gathered from every rank. Evaluation encodes the full image (the towers' ordinary
forward), as the paper does without its optional unmasked tuning.
"""

from __future__ import annotations

from harmony.objective_config import FLIPConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, Needs, Objective, StepInfo, register
from harmony.objectives.clip import hard_contrast


@register
class FLIPObjective(Objective):
    """CLIP's hard image-text contrast with the image embedding of the patch-dropped crop 0."""

    key = "flip"
    batch_coupled = True

    @classmethod
    def needs_for(cls, section: FLIPConfig) -> Needs:
        return Needs(
            dropped_crops={0},
            keep_ratio=1.0 - section.mask_ratio,
            text_clean=True,
            embeddings=True,
            embeddings_dropped=True,
        )

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        return LossOutput(hard_contrast(enc)[2], {"logit_scale": enc.logit_scale.detach()})
