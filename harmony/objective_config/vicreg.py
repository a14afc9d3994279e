"""The config section of VICReg (Bardes, Ponce & LeCun 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harmony.objective_config.section import ObjectiveSection


@dataclass
class VICRegConfig(ObjectiveSection):
    """VICReg between the two global crops: invariance (MSE), variance (a hinge on each dimension's standard
    deviation over the global batch at `variance_target`, with `epsilon` under the root) and covariance (the
    squared off-diagonal covariances / dimension), weighted 25 / 25 / 1 as the paper. `hidden_dim` and
    `out_dim` size the 3-layer expander (8192 and 8192 in the paper)."""

    min_batch: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its variance and covariance are taken over the batch"

    weight: float = 1.0
    invariance_weight: float = 25.0
    variance_weight: float = 25.0
    covariance_weight: float = 1.0
    variance_target: float = 1.0
    epsilon: float = 1e-4
    hidden_dim: int = 8192
    out_dim: int = 8192

    def positives(self) -> dict[str, float]:
        return {
            "hidden_dim": self.hidden_dim,
            "out_dim": self.out_dim,
            "variance_target": self.variance_target,
            "epsilon": self.epsilon,
        }
