"""iBOT self-distillation (DINO when the patch term is off).

CLS loss: mean over every (teacher global crop q, student view v != q) pair of
    mean_b CE(softmax((t_q - c_cls) / tau_cls), log_softmax(s_v / 0.1)).
Patch loss: per global crop, CE on its masked tokens, averaged per image over its masked tokens, then
over the images of the crop (images without masked tokens count as 0) and over crops.
L_ibot = 1/2 (L_cls + L_patch) as in the paper's code; L_dino = L_cls.

The student sees masked global crops and the local crops; the teacher sees the clean global crops.
One head is shared by CLS and patch tokens and is run only on tokens a loss uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harmony.objective_config import HeadConfig, IBOTConfig
from harmony.objectives.base import Batch, BlockMasks, Encoded, LossOutput, Needs, StepInfo, register
from harmony.objectives.centering import Center, mean_entropy, sharpen, soft_cross_entropy
from harmony.objectives.distill import SelfDistillation


def ibot_cls_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """student_logits [V, B, K] (global views first), teacher_probs [G, B, K]."""
    num_views, batch = student_logits.shape[:2]
    num_global = teacher_probs.shape[0]
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    cross = -torch.einsum("qbk,vbk->qv", teacher_probs.float(), log_p) / batch  # [G, V] mean CE per pair
    same_view = torch.zeros(num_global, num_views, dtype=torch.bool, device=cross.device)
    same_view[:, :num_global] = torch.eye(num_global, dtype=torch.bool, device=cross.device)
    return cross[~same_view].mean()


def ibot_patch_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, token_weight: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Masked-token CE. Rows are masked tokens; `token_weight` = 1 / (masked tokens in its image x B x G)
    encodes the per-image, per-crop averaging (see `harmony.data.masking.patch_loss_weights`)."""
    return (soft_cross_entropy(teacher_probs, student_logits, student_temp) * token_weight).sum()


@register
class IBOTObjective(SelfDistillation):
    """iBOT (DINO with `patch_loss` off): the student's masked global crops and local crops are matched to
    the EMA teacher's centred, sharpened distributions on the clean global crops, CLS and masked patches."""

    key = "ibot"

    def __init__(self, cfg: IBOTConfig, head: HeadConfig, embed_dim: int) -> None:
        super().__init__(cfg)
        self.make_heads(embed_dim, head)
        self.cls_center = Center(head.out_dim, cfg.center_momentum)
        self.patch_center = Center(head.out_dim, cfg.center_momentum) if cfg.patch_loss else None

    @classmethod
    def needs_for(cls, section: IBOTConfig) -> Needs:
        masks = None
        if section.patch_loss:
            masks = BlockMasks(
                section.mask_probability,
                section.mask_ratio_min,
                section.mask_ratio_max,
                section.mask_min_patches,
                section.mask_aspect_min,
            )
        return Needs(
            num_global=2, global_crops=True, local_crops=section.local_crops, teacher_crops={0, 1}, block_masks=masks
        )

    def frozen_parameters(self, step: StepInfo) -> list[torch.nn.Parameter]:
        if step.epoch < self.cfg.freeze_last_layer_epochs:
            return list(self.student_head.last_layer.parameters())
        return []

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        bsz = enc.global_crops.shape[1]
        student_cls = [enc.global_crops[:, :, 0]]
        if enc.has("local"):
            student_cls.append(enc.local[:, :, 0])
        cls_tokens = torch.cat(student_cls, dim=0)  # [V, B, D]
        num_views = cls_tokens.shape[0]
        rows = [cls_tokens.flatten(0, 1)]
        if self.cfg.patch_loss:
            index = batch["ibot_index"]
            rows.append(enc.global_crops[:, :, 1:].flatten(0, 2)[index])
        out = self.student_head(torch.cat(rows))
        student_cls_logits = out[: num_views * bsz].view(num_views, bsz, -1)

        with torch.no_grad():
            teacher_tokens = enc.teacher if self.cfg.patch_loss else enc.teacher[:, :, :1]
            t_out = self.teacher_head(teacher_tokens)  # [G, B, 1 (+N), K]
            t_cls = t_out[:, :, 0]
            teacher_cls = sharpen(t_cls, self.cls_center.value, self.cfg.teacher_temp_cls)
            self.cls_center.observe(t_cls.flatten(0, 1))

        loss_cls = ibot_cls_loss(student_cls_logits, teacher_cls, self.cfg.student_temp)
        metrics = {"ibot_cls": loss_cls.detach(), "ibot_cls_target_entropy": mean_entropy(teacher_cls)}
        if not self.cfg.patch_loss:
            return LossOutput(loss_cls, metrics)

        assert self.patch_center is not None
        with torch.no_grad():
            t_patch = t_out[:, :, 1:]
            temp = self.teacher_temperature(step)
            teacher_patch = sharpen(t_patch.flatten(0, 2)[index], self.patch_center.value, temp)
            self.patch_center.observe(t_patch.flatten(0, 2))
        loss_patch = ibot_patch_loss(out[num_views * bsz :], teacher_patch, batch["ibot_weight"], self.cfg.student_temp)
        metrics |= {"ibot_patch": loss_patch.detach(), "ibot_patch_target_entropy": mean_entropy(teacher_patch)}
        return LossOutput(0.5 * (loss_cls + loss_patch), metrics)
