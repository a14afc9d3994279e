"""The config section of FILIP (Yao et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harmony.objective_config.section import ObjectiveSection, one_logit_scale


@dataclass
class FILIPConfig(ObjectiveSection):
    """FILIP's token-wise late-interaction image-text contrast over the global batch, with the model's one
    learnable logit scale (its init and cap here, as CLIP's)."""

    min_batch: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its contrast needs a negative pair (another caption or image of the batch)"
    excludes: ClassVar[dict[str, str]] = {
        "flip": "FILIP reads the full image's patch tokens and the model's one image embedding of the full image, "
        "FLIP that of the patch-dropped image",
    }

    weight: float = 1.0
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0

    def positives(self) -> dict[str, float]:
        return {"logit_scale_init": self.logit_scale_init, "logit_scale_max": self.logit_scale_max}

    def shared(self) -> dict[str, tuple[str, object]]:
        return one_logit_scale(self.logit_scale_init, self.logit_scale_max)
