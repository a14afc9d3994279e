"""What objectives declare and receive.

An objective declares the forward passes it reads (`Needs`); the task unions the needs of all enabled
objectives, runs each distinct pass once (student and teacher), and hands every objective the same
`Encoded` outputs. Objectives own their heads/decoders (and teacher copies of heads) and return an
unweighted loss plus metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Needs:
    num_global: int = 1
    clean_crops: set[int] = field(default_factory=set)
    masked_crops: bool = False
    local_crops: int = 0
    dropped_crops: set[int] = field(default_factory=set)
    keep_ratio: float = 0.0
    teacher_crops: set[int] = field(default_factory=set)
    text_clean: bool = False
    text_masked: bool = False
    teacher_text: bool = False
    text_mask_prob: float = 0.0

    def union(self, other: Needs) -> Needs:
        if self.dropped_crops and other.dropped_crops and self.keep_ratio != other.keep_ratio:
            raise ValueError("two objectives drop patches with different keep ratios; they must share one")
        if self.text_masked and other.text_masked and self.text_mask_prob != other.text_mask_prob:
            raise ValueError("two objectives mask captions with different probabilities; they must share one")
        return Needs(
            num_global=max(self.num_global, other.num_global),
            clean_crops=self.clean_crops | other.clean_crops,
            masked_crops=self.masked_crops or other.masked_crops,
            local_crops=max(self.local_crops, other.local_crops),
            dropped_crops=self.dropped_crops | other.dropped_crops,
            keep_ratio=self.keep_ratio or other.keep_ratio,
            teacher_crops=self.teacher_crops | other.teacher_crops,
            text_clean=self.text_clean or other.text_clean,
            text_masked=self.text_masked or other.text_masked,
            teacher_text=self.teacher_text or other.teacher_text,
            text_mask_prob=self.text_mask_prob or other.text_mask_prob,
        )

    @property
    def needs_text(self) -> bool:
        return self.text_clean or self.text_masked or self.teacher_text

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_crops) or self.teacher_text


@dataclass
class StepInfo:
    """Where training is: schedules inside objectives read `epoch` (fractional) and `step`."""

    step: int
    steps_per_epoch: int

    @property
    def epoch(self) -> float:
        return self.step / max(self.steps_per_epoch, 1)


@dataclass
class Encoded:
    """Outputs of the shared forward passes of one step (token tensors are [B, 1 + N, D], CLS first)."""

    images: torch.Tensor | None = None  # normalised global crops [G, B, 3, H, W]
    grid: tuple[int, int] = (0, 0)
    pos_embed: torch.Tensor | None = None  # the student's position table for the global grid [1, 1 + N, D]
    clean: dict[int, torch.Tensor] = field(default_factory=dict)
    masked: torch.Tensor | None = None  # [G, B, 1 + N, D]
    local: torch.Tensor | None = None  # [L, B, 1 + n, D]
    dropped: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, 1 + K, D]
    teacher: torch.Tensor | None = None  # [G, B, 1 + N, D], no grad
    text: torch.Tensor | None = None  # [B, T, W] clean caption, student
    text_masked: torch.Tensor | None = None  # [B, T, W] masked caption, student
    teacher_text: torch.Tensor | None = None  # [B, T, W] clean caption, teacher
    image_embed: torch.Tensor | None = None  # student CLIP embedding of crop 0
    text_embed: torch.Tensor | None = None
    teacher_image_embed: torch.Tensor | None = None
    teacher_text_embed: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: `needs`, `forward(encoded, batch, step) -> LossOutput`, optional EMA'd heads."""

    name: str = ""

    def needs(self) -> Needs:
        raise NotImplementedError

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher module, student module) pairs this objective owns, for the EMA update."""
        return []

    def after_step(self) -> None:
        """Advance per-step state (centres) once per optimiser step."""

    def frozen_parameters(self, step: StepInfo) -> list[nn.Parameter]:
        """Parameters whose gradients are zeroed at this step (DINO's last-layer freeze)."""
        return []
