"""The self-distillation machinery shared by iBOT/DINO, text self-distillation and MaskCLIP.

A `SelfDistillation` objective owns a student head, its EMA teacher copy (updated by the task with
the towers' momentum) and one or more `Center`s of raw teacher logits (advanced once per optimiser
step). Teacher targets are softmax((t - c) / tau) (`sharpen`); a teacher temperature may warm up
linearly over the first epochs (`warmup_temperature`).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from harmony.core.ramps import linear_ramp
from harmony.models.heads import DINOHead
from harmony.objective_config import HeadConfig
from harmony.objectives.base import ModelDims, Objective, StepInfo
from harmony.objectives.centering import Center


def warmup_temperature(start: float, end: float, warmup_epochs: float, step: StepInfo) -> float:
    """start -> end linearly over `warmup_epochs` (fractional epochs), then end; `end` at once without warm-up."""
    progress = step.epoch / warmup_epochs if warmup_epochs > 0 else 1.0
    return linear_ramp(start, end, progress)


class SelfDistillation(Objective):
    """Base of the objectives that distil an EMA teacher head into a student head. By default the heads read
    the vision tower's tokens and are shaped by `model.head`: the constructor takes (section, head, width)."""

    student_head: DINOHead
    teacher_head: DINOHead

    @classmethod
    def build(cls, section: Any, dims: ModelDims) -> Objective:
        return cls(section, dims.head, dims.vision_width)  # type: ignore[call-arg]

    def make_heads(self, in_dim: int, head: HeadConfig) -> None:
        """The student head and its frozen EMA copy (built in this order: the copy draws no random numbers)."""
        self.student_head = DINOHead(in_dim, head.out_dim, head.hidden_dim, head.bottleneck_dim, head.num_layers)
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)

    def teacher_temperature(self, step: StepInfo) -> float:
        """The teacher temperature at `step`, from the section's `teacher_temp_start/end/warmup_epochs`."""
        cfg = self.cfg
        return warmup_temperature(cfg.teacher_temp_start, cfg.teacher_temp_end, cfg.teacher_temp_warmup_epochs, step)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher_head, self.student_head)]

    def after_step(self) -> None:
        """Fold every centre's pending batch statistics in (once per optimiser step)."""
        for module in self.children():
            if isinstance(module, Center):
                module.update()

    def flop_parts(self) -> dict[str, list[nn.Module]]:
        return {"heads": [self.student_head, self.teacher_head]}
