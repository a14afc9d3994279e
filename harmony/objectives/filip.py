"""FILIP (Yao et al. 2021): a contrast of image and caption by token-wise late interaction.

Crop 0's patch tokens x (CLS left out) and every caption token y go through the model's joint-space projections
and are L2-normalised (`Encoded.image_token_embed`, `text_token_embed`). With R_j caption j's real tokens (start,
word pieces, end-of-text: padding excluded, however far the batch was padded),
    s_i2t(i, j) = mean over patches p of i of max over t in R_j of x_p . y_t,
    s_t2i(i, j) = mean over t in R_j of max over patches p of i of x_p . y_t,
and with the model's learnable scale s (shared with CLIP, as SigLIP and FLIP share it)
    L = 1/2 [CE(I, softmax(s S_i2t)) + CE(I, softmax(s S_t2i^T))],
this rank's images and captions as rows against the tokens of every rank as columns (gathered with gradient, as
CLIP gathers embeddings). Each rank cuts its captions after its own longest one, so before the gather every rank
pads its caption tokens to the longest of all ranks (the padding is excluded as any other).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harmony.core.distributed import gather_no_grad, gather_with_grad, rank, world_size
from harmony.objective_config import FILIPConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, Needs, Objective, StepInfo, register
from harmony.objectives.clip import clip_hard_loss


def late_interaction(
    image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_i2t, S_t2i), each [I, J], of images [I, P, E] and captions [J, T, E] with real positions [J, T]."""
    sim = torch.einsum("ipe,jte->ijpt", image_tokens, text_tokens)  # [I, J, P, T]
    real = text_real[None, :, None, :]
    i2t = sim.masked_fill(~real, float("-inf")).amax(dim=3).mean(dim=2)
    best_patch = sim.amax(dim=2)  # [I, J, T]
    t2i = (best_patch * text_real[None]).sum(dim=2) / text_real.sum(dim=1)[None]
    return i2t, t2i


def pad_captions(tokens: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption tokens [B, T, E] and real positions [B, T] padded to the longest T of every rank."""
    if world_size() == 1:
        return tokens, real
    length = int(gather_no_grad(torch.tensor([tokens.shape[1]], device=tokens.device)).max())
    extra = length - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(real, (0, extra), value=False)


def filip_logits(
    image_local: torch.Tensor,
    text_local: torch.Tensor,
    real_local: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    real_all: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_per_image, logits_per_text), each [B, N]: this rank's rows against every rank's columns."""
    per_image = late_interaction(image_local, text_all, real_all)[0]
    per_text = late_interaction(image_all, text_local, real_local)[1].t()
    return scale * per_image, scale * per_text


@register
class FILIPObjective(Objective):
    """FILIP's token-wise contrast of the student's crop 0 and its caption, with the model's logit scale."""

    key = "filip"
    batch_coupled = True

    @classmethod
    def needs_for(cls, section: FILIPConfig) -> Needs:
        return Needs(clean_crops={0}, text_clean=True, embeddings=True, token_embeddings=True)

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        image, text = enc.image_token_embed, enc.text_token_embed
        text, real = pad_captions(text, batch["text_real"])
        lpi, lpt = filip_logits(
            image, text, real, gather_with_grad(image), gather_with_grad(text), gather_no_grad(real), enc.logit_scale
        )
        loss = clip_hard_loss(lpi, lpt, offset=rank() * image.shape[0])
        return LossOutput(loss, {"logit_scale": enc.logit_scale.detach()})
