"""The shape BYOL and MoCo v3 share: on the two clean global crops, an online projector + predictor on the
student's CLS tokens against an EMA copy of the projector on the EMA teacher's CLS tokens (the target).

A subclass builds its projector and predictor and calls `set_heads`; it writes only its loss (`forward`).
The target projector follows the online one with the towers' momentum (`ema_pairs`); the predictor has no copy.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from harmony.objectives.base import Needs
from harmony.objectives.crop_pair import CropPairObjective


class TargetProjectorObjective(CropPairObjective):
    """Base of the projector + predictor methods with an EMA target projector (batch-coupled: BatchNorm heads)."""

    projector: nn.Module
    predictor: nn.Module
    target_projector: nn.Module

    def set_heads(self, projector: nn.Module, predictor: nn.Module) -> None:
        """The online heads and the target copy of the projector (a copy draws no random numbers)."""
        self.projector, self.predictor = projector, predictor
        self.target_projector = copy.deepcopy(projector).requires_grad_(False)

    @classmethod
    def needs_for(cls, section: Any) -> Needs:
        """The two clean crops, and the teacher's pass over both (the targets)."""
        return dataclasses.replace(super().needs_for(section), teacher_crops={0, 1})

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.target_projector, self.projector)]

    def flop_parts(self) -> dict[str, list[nn.Module]]:
        return {"heads": [self.projector, self.predictor, self.target_projector]}
