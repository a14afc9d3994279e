"""MoCo v2's config section: a momentum key encoder and a queue of negatives (He et al. 2020; Chen et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass

from harmony.objective_config.section import ObjectiveSection


@dataclass
class MoCoV2Config(ObjectiveSection):
    """MoCo v2: the query of one global crop against the momentum key of the other and `queue_size` negatives
    (the keys of earlier batches), InfoNCE at `temperature`; the head is Linear(width, width)-ReLU-Linear to
    `out_dim`. The key encoder's momentum is the `teacher.*` schedule (the preset: 0.999, constant)."""

    weight: float = 1.0
    temperature: float = 0.2
    queue_size: int = 65536
    out_dim: int = 128

    def positives(self) -> dict[str, float]:
        return {"temperature": self.temperature, "queue_size": self.queue_size, "out_dim": self.out_dim}
