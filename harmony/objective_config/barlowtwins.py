"""The config section of Barlow Twins (Zbontar et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harmony.objective_config.section import ObjectiveSection


@dataclass
class BarlowTwinsConfig(ObjectiveSection):
    """Barlow Twins between the two global crops: the cross-correlation of their batch-normalised projections
    over the global batch is pulled to the identity; `lambd` weighs the off-diagonal terms (the paper's 5e-3).
    `hidden_dim` and `out_dim` size the 3-layer projector (8192 and 8192 in the paper)."""

    min_batch: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its embeddings are normalised over the batch (BatchNorm)"

    weight: float = 1.0
    lambd: float = 5e-3
    hidden_dim: int = 8192
    out_dim: int = 8192

    def positives(self) -> dict[str, float]:
        return {"hidden_dim": self.hidden_dim, "out_dim": self.out_dim, "lambd": self.lambd}
