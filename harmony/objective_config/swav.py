"""The config section of SwAV (Caron et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from harmony.objective_config.section import ObjectiveSection
from harmony.typed import ConfigError


@dataclass
class SwAVConfig(ObjectiveSection):
    """SwAV over the two global crops and `local_crops` local crops: each global crop's codes (Sinkhorn-Knopp over
    the global batch, `sinkhorn_iterations` at `epsilon`) are predicted from every other crop's scores against the
    `num_prototypes` prototypes at `temperature`. The prototypes get no update for the first
    `freeze_prototypes_epochs`. `queue_length` > 0 keeps that many past embeddings of each global crop (the global
    batch's, from `queue_start_epochs` on) and adds them to Sinkhorn's columns once the queue is full."""

    min_batch: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its codes are spread over the batch (Sinkhorn) and its head normalises it"

    weight: float = 1.0
    local_crops: int = 6
    hidden_dim: int = 2048
    out_dim: int = 128
    num_prototypes: int = 3000
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_epochs: float = 1.0
    queue_length: int = 0
    queue_start_epochs: float = 15.0

    def positives(self) -> dict[str, float]:
        return {
            "hidden_dim": self.hidden_dim,
            "out_dim": self.out_dim,
            "num_prototypes": self.num_prototypes,
            "temperature": self.temperature,
            "epsilon": self.epsilon,
            "sinkhorn_iterations": self.sinkhorn_iterations,
        }

    def check(self, key: str) -> None:
        for name in ("local_crops", "queue_length", "freeze_prototypes_epochs", "queue_start_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{key}.{name}' must be 0 or more, got {getattr(self, name)}")
