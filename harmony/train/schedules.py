"""Step-based schedules (every value is a pure function of the optimiser step)."""

from __future__ import annotations

from dataclasses import dataclass

from harmony.config import Config
from harmony.core.ramps import cosine_ramp, linear_ramp


@dataclass(frozen=True)
class Schedules:
    """lr (linear warm-up, cosine to min_lr), weight decay (cosine), teacher momentum."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    wd_start: float
    wd_end: float
    momentum_start: float
    momentum_end: float
    momentum_linear: bool

    @classmethod
    def from_config(cls, cfg: Config, steps_per_epoch: int, total_steps: int) -> Schedules:
        return cls(
            peak_lr=cfg.optim.lr * cfg.train.batch_size / 256.0,
            min_lr=cfg.optim.min_lr,
            warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
            total_steps=max(total_steps, 1),
            wd_start=cfg.optim.weight_decay,
            wd_end=cfg.optim.weight_decay_end,
            momentum_start=cfg.teacher.momentum_start,
            momentum_end=cfg.teacher.momentum_end,
            momentum_linear=cfg.teacher.schedule == "linear",
        )

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        decay = max(self.total_steps - self.warmup_steps, 1)
        return cosine_ramp(self.peak_lr, self.min_lr, (step - self.warmup_steps) / decay)

    def weight_decay(self, step: int) -> float:
        return cosine_ramp(self.wd_start, self.wd_end, step / self.total_steps)

    def momentum(self, step: int) -> float:
        ramp = linear_ramp if self.momentum_linear else cosine_ramp
        return ramp(self.momentum_start, self.momentum_end, step / self.total_steps)
