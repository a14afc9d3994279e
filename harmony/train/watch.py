"""Watching a run: evaluation during training (`train.eval_every`) and the best checkpoint (`train.keep_best`).

The evaluation itself lives in `harmony.eval.during` (the protocols of `harmony eval`), a layer above training;
the command that starts a run hands its builder to the trainer (`EvaluationBuilder`). The trainer gives it the
weights, and `preserved_rng` keeps every random number generator where training left it, so a run with
evaluation has the losses of one without, step for step.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from harmony.config import Config
from harmony.core.distributed import DistInfo, full
from harmony.core.errors import ConfigError

Weights = dict[str, dict[str, torch.Tensor]]


class Evaluation(Protocol):
    """Scores the student's and the teacher's weights; called on every rank at the same steps."""

    def metric_names(self) -> list[str]:
        """Every metric a call returns (`eval/...`), known before the first call."""
        ...

    def __call__(self, weights: Weights) -> dict[str, float]:
        """The metrics of `weights` ({"student": state dict, "teacher": state dict}); the same on every rank."""
        ...


# (config, processes, device, {"student" / "teacher": has a text tower}) -> the run's evaluation
EvaluationBuilder = Callable[[Config, DistInfo, torch.device, dict[str, bool]], Evaluation]


def tower_weights(parts: Mapping[str, nn.Module | None]) -> Weights:
    """Plain state dicts of the named models (FSDP's shards gathered: a collective, so every rank calls it)."""
    return {name: {k: full(v) for k, v in m.state_dict().items()} for name, m in parts.items() if m is not None}


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Every generator training draws from (torch on the CPU and the device, Python's `random`, NumPy) is put back
    as it was, whatever the block drew (a data loader's seed, for one)."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    try:
        yield
    finally:
        torch.set_rng_state(states["torch"])
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        if "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"], device)


class BestKeeper:
    """`train.keep_best`: whether a logged value beats the best so far (`best.json` in the run folder remembers it
    across a resume)."""

    def __init__(self, metric: str, mode: str, out_dir: Path) -> None:
        self.metric, self.mode = metric, mode
        self.path = out_dir / "best.json"
        self.best: float | None = None
        self.seen = False
        if self.path.is_file():
            stored = json.loads(self.path.read_text())
            if stored.get("metric") == metric and stored.get("mode") == mode:
                self.best = float(stored["value"])

    def check_known(self, names: list[str]) -> None:
        """An evaluation metric the evaluation does not log is refused before training starts."""
        if self.metric.startswith("eval/") and self.metric not in names:
            shown = ", ".join(n for n in names if n != "eval/time_s")
            raise ConfigError(
                f"config key 'train.keep_best' names '{self.metric}', which this run never logs; its evaluation "
                f"logs {shown or 'nothing'}"
            )

    def improves(self, record: Mapping[str, Any], training_row: bool) -> bool:
        """True when `record` holds the metric at a better value than before; a training row without a
        non-evaluation metric means it is never logged (a one-line ConfigError)."""
        value = record.get(self.metric)
        if value is None:
            if training_row and not self.metric.startswith("eval/") and not self.seen:
                raise ConfigError(
                    f"config key 'train.keep_best' names '{self.metric}', which this run does not log; its metrics "
                    f"are {', '.join(k for k in record if k != 'step')}"
                )
            return False
        self.seen = True
        value = float(value)
        if not math.isfinite(value):
            return False
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best = value
        return better

    def record(self, step: int, checkpoint: Path) -> None:
        """`best.json`: the metric, its best value, the step and the checkpoint holding those weights."""
        entry = {
            "metric": self.metric,
            "mode": self.mode,
            "value": self.best,
            "step": step,
            "checkpoint": str(checkpoint),
        }
        partial = self.path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(entry, indent=2) + "\n")
        partial.replace(self.path)
