"""Masked language modelling: the student text tower reads the masked caption, a bidirectional
decoder predicts the original word piece at every masked position (cross-entropy over the vocabulary).

The loss is normalised by the global number of masked tokens, so it does not depend on how the
masked tokens happen to be spread over ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harmony.core.distributed import global_count
from harmony.models.decoders import MLMDecoder
from harmony.objective_config import MLMConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, ModelDims, Needs, Objective, StepInfo, register


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies / normaliser (the global masked-token count per rank)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum") / normaliser


@register
class MLMObjective(Objective):
    """Masked language modelling on the student text tower's reading of the masked caption."""

    key = "mlm"

    def __init__(self, cfg: MLMConfig, text_width: int, vocab_size: int) -> None:
        super().__init__(cfg)
        d = cfg.decoder
        self.decoder = MLMDecoder(text_width, vocab_size, width=d.width, depth=d.depth, heads=d.heads)

    @classmethod
    def needs_for(cls, section: MLMConfig) -> Needs:
        return Needs(text_masked=True, text_mask_prob=section.mask_prob)

    @classmethod
    def build(cls, section: MLMConfig, dims: ModelDims) -> MLMObjective:
        return cls(section, dims.text_width, dims.vocab_size)

    def flop_parts(self) -> dict[str, list[torch.nn.Module]]:
        return {"MLM decoder": [self.decoder]}

    def micro_batch_share(self, micro: Batch, full: Batch) -> torch.Tensor:
        """The loss is a sum over masked tokens / their global count: a micro-batch weighs by its token count."""
        count = global_count(micro["mlm_index"].new_tensor(micro["mlm_index"].numel()))
        return count / global_count(full["mlm_index"].new_tensor(full["mlm_index"].numel()))

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        index = batch["mlm_index"]
        logits = self.decoder(enc.text_masked, ~batch["text_real"], index)
        targets = batch["text"].flatten()[index]
        loss = mlm_loss(logits, targets, global_count(index.new_tensor(index.numel())))
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == targets).float().mean() if index.numel() else logits.new_zeros(())
        return LossOutput(loss, {"mlm_accuracy": accuracy})
