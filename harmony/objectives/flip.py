"""FLIP (Li et al. 2023): CLIP whose image tower sees only a random part of the patches during training.

In training, crop 0 keeps a random (1 - mask_ratio) of its patches (MAE-style dropping, the task's
patch-dropped pass; no mask tokens); the image embedding comes from that pass and the loss is CLIP's hard loss,
L = 1/2 [CE(I, softmax L) + CE(I, softmax L^T)],  L = s * Z_img Z_txt^T  (see `harmony.objectives.clip`),
local rows against columns gathered from every rank. Evaluation encodes the full image (the towers' ordinary
forward), as the paper does without its optional unmasked tuning.
"""

from __future__ import annotations

from harmony.core.distributed import gather_with_grad, rank
from harmony.objective_config import FLIPConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, ModelDims, Needs, Objective, StepInfo, register
from harmony.objectives.clip import clip_hard_loss, contrastive_logits


@register
class FLIPObjective(Objective):
    """CLIP's hard image-text contrast with the image embedding of the patch-dropped crop 0."""

    key = "flip"
    config_type = FLIPConfig
    batch_coupled = True

    def __init__(self, cfg: FLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @classmethod
    def needs_for(cls, section: FLIPConfig) -> Needs:
        return Needs(
            dropped_crops={0},
            keep_ratio=1.0 - section.mask_ratio,
            text_clean=True,
            embeddings=True,
            embeddings_dropped=True,
        )

    @classmethod
    def build(cls, section: FLIPConfig, dims: ModelDims) -> FLIPObjective:
        return cls(section)

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        image, text = enc.image_embed, enc.text_embed
        lpi, lpt = contrastive_logits(image, text, gather_with_grad(image), gather_with_grad(text), enc.logit_scale)
        loss = clip_hard_loss(lpi, lpt, offset=rank() * image.shape[0])
        return LossOutput(loss, {"logit_scale": enc.logit_scale.detach()})
