"""iBOT self-distillation (DINO when the patch term is off).

CLS loss: mean over every (teacher global crop q, student view v != q) pair of
    mean_b CE(softmax((t_q - c_cls) / tau_cls), log_softmax(s_v / 0.1)).
Patch loss: per global crop, CE on its masked tokens, averaged per image over its masked tokens, then
over the images of the crop (images without masked tokens count as 0) and over crops.
L_ibot = 1/2 (L_cls + L_patch) as in the paper's code; L_dino = L_cls.

The lecture's ablations (`objectives.ibot.*`): `teacher: student` takes the targets from the student's current
weights (its own outputs on the clean global crops, without gradient; no EMA tower or head); `loss: mse` puts
||P - Q||^2 in place of CE(P, Q); `predictor` adds an MLP (bottleneck -> hidden -> bottleneck, GELU) between the
student head's MLP and its last layer, on the student side only.

The student sees masked global crops and the local crops; the teacher sees the clean global crops.
One head is shared by CLS and patch tokens and is run only on tokens a loss uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harmony.objective_config import HeadConfig, IBOTConfig
from harmony.objectives.base import Batch, BlockMasks, Encoded, LossOutput, Needs, StepInfo, register
from harmony.objectives.centering import Center, mean_entropy, sharpen, soft_cross_entropy, soft_squared_error
from harmony.objectives.distill import SelfDistillation


def ibot_cls_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float, mse: bool = False
) -> torch.Tensor:
    """student_logits [V, B, K] (global views first), teacher_probs [G, B, K]; with `mse` the squared distance
    ||P - Q||^2 = |P|^2 + |Q|^2 - 2 P.Q per sample in place of CE(P, Q)."""
    num_views, batch = student_logits.shape[:2]
    num_global = teacher_probs.shape[0]
    teacher = teacher_probs.float()
    if mse:
        q = F.softmax(student_logits.float() / student_temp, dim=-1)
        dot = torch.einsum("qbk,vbk->qv", teacher, q) / batch
        sizes = teacher.square().sum(dim=-1).mean(dim=-1)[:, None] + q.square().sum(dim=-1).mean(dim=-1)[None]
        cross = sizes - 2.0 * dot  # [G, V] mean squared distance per pair
    else:
        log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
        cross = -torch.einsum("qbk,vbk->qv", teacher, log_p) / batch  # [G, V] mean CE per pair
    same_view = torch.zeros(num_global, num_views, dtype=torch.bool, device=cross.device)
    same_view[:, :num_global] = torch.eye(num_global, dtype=torch.bool, device=cross.device)
    return cross[~same_view].mean()


def ibot_patch_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    token_weight: torch.Tensor,
    student_temp: float,
    mse: bool = False,
) -> torch.Tensor:
    """Masked-token CE (squared distance with `mse`). Rows are masked tokens; `token_weight` = 1 / (masked tokens
    in its image x B x G) encodes the per-image, per-crop averaging (see `harmony.data.masking.patch_loss_weights`)."""
    per_token = soft_squared_error if mse else soft_cross_entropy
    return (per_token(teacher_probs, student_logits, student_temp) * token_weight).sum()


@register
class IBOTObjective(SelfDistillation):
    """iBOT (DINO with `patch_loss` off): the student's masked global crops and local crops are matched to
    the EMA teacher's centred, sharpened distributions on the clean global crops, CLS and masked patches."""

    key = "ibot"

    def __init__(self, cfg: IBOTConfig, head: HeadConfig, embed_dim: int) -> None:
        super().__init__(cfg)
        self.make_heads(embed_dim, head)
        if cfg.teacher == "student":  # the teacher is the student: one head, its current weights
            self.teacher_head = self.student_head
        self.cls_center = Center(head.out_dim, cfg.center_momentum)
        self.patch_center = Center(head.out_dim, cfg.center_momentum) if cfg.patch_loss else None
        self.predictor = (
            nn.Sequential(
                nn.Linear(head.bottleneck_dim, head.hidden_dim),
                nn.GELU(),
                nn.Linear(head.hidden_dim, head.bottleneck_dim),
            )
            if cfg.predictor
            else None
        )

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
        ema = section.teacher == "ema"  # else the targets come from the student's own pass over the clean crops
        return Needs(
            num_global=2,
            global_crops=True,
            local_crops=section.local_crops,
            teacher_crops={0, 1} if ema else set(),
            clean_crops=set() if ema else {0, 1},
            block_masks=masks,
        )

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return super().ema_pairs() if self.cfg.teacher == "ema" else []

    def flop_parts(self) -> dict[str, list[nn.Module]]:
        """The heads; with the predictor the student head's parts are called one by one, so they are named too."""
        if self.predictor is None:
            return super().flop_parts()
        head = self.student_head
        return {"heads": [head.mlp, self.predictor, head.last_layer, self.teacher_head]}

    def student_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The student head on `tokens`, through the predictor (between the head's MLP and last layer) if on."""
        if self.predictor is None:
            return self.student_head(tokens)
        head = self.student_head
        return head.last_layer(F.normalize(self.predictor(head.mlp(tokens)), dim=-1))

    def teacher_tokens(self, enc: Encoded) -> torch.Tensor:
        """The tokens of the two clean global crops the targets are computed from [2, B, 1 + N, D]: the EMA
        teacher's, or (`teacher: student`) the student's own, without gradient."""
        if self.cfg.teacher == "ema":
            return enc.teacher
        return torch.stack([enc.clean[0], enc.clean[1]]).detach()

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
        out = self.student_logits(torch.cat(rows))
        student_cls_logits = out[: num_views * bsz].view(num_views, bsz, -1)

        with torch.no_grad():
            teacher_tokens = self.teacher_tokens(enc)
            teacher_tokens = teacher_tokens if self.cfg.patch_loss else teacher_tokens[:, :, :1]
            t_out = self.teacher_head(teacher_tokens)  # [G, B, 1 (+N), K]
            t_cls = t_out[:, :, 0]
            teacher_cls = sharpen(t_cls, self.cls_center.value, self.cfg.teacher_temp_cls)
            self.cls_center.observe(t_cls.flatten(0, 1))

        mse = self.cfg.loss == "mse"
        loss_cls = ibot_cls_loss(student_cls_logits, teacher_cls, self.cfg.student_temp, mse)
        metrics = {"ibot_cls": loss_cls.detach(), "ibot_cls_target_entropy": mean_entropy(teacher_cls)}
        if not self.cfg.patch_loss:
            return LossOutput(loss_cls, metrics)

        assert self.patch_center is not None
        with torch.no_grad():
            t_patch = t_out[:, :, 1:]
            temp = self.teacher_temperature(step)
            teacher_patch = sharpen(t_patch.flatten(0, 2)[index], self.patch_center.value, temp)
            self.patch_center.observe(t_patch.flatten(0, 2))
        loss_patch = ibot_patch_loss(
            out[num_views * bsz :], teacher_patch, batch["ibot_weight"], self.cfg.student_temp, mse
        )
        metrics |= {"ibot_patch": loss_patch.detach(), "ibot_patch_target_entropy": mean_entropy(teacher_patch)}
        return LossOutput(0.5 * (loss_cls + loss_patch), metrics)
