"""The shape SimCLR, SimSiam, BYOL and MoCo v3 share: a loss between the student's CLS tokens of the two clean
global crops, through heads sized from the vision tower's width, coupling the samples of the batch (a contrast
over the batch, or BatchNorm in the heads). A subclass's constructor takes (section, vision width)."""

from __future__ import annotations

from typing import Any

from harmony.objectives.base import ModelDims, Needs, Objective


class CropPairObjective(Objective):
    """Base of the objectives between the two clean global crops (module doc)."""

    batch_coupled = True

    @classmethod
    def needs_for(cls, section: Any) -> Needs:
        return Needs(num_global=2, clean_crops={0, 1})

    @classmethod
    def build(cls, section: Any, dims: ModelDims) -> Objective:
        return cls(section, dims.vision_width)  # type: ignore[call-arg]
