"""The training loop: data, optimiser, precision, schedules, EMA, checkpoints and logging.

It knows nothing about individual objectives: the task returns a weighted loss and metrics, and
`task.after_step` advances teachers and centres once per optimiser step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harmony.config import Config, dump_yaml, to_dict
from harmony.data.loader import build_train_data
from harmony.data.views import ViewMaker
from harmony.train import checkpoint as ckpt
from harmony.train.distributed import DistInfo, all_reduce_mean, init_distributed, shutdown
from harmony.train.logger import MetricsLogger
from harmony.train.step import Stepper, TrainingError, resolve_device


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    checkpoint: Path
    last_metrics: dict[str, float]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def total_steps_of(cfg: Config, steps_per_epoch: int) -> int:
    """Run length: `train.max_steps` when set (schedules then span it), else epochs x steps per epoch."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


class Trainer:
    """Data + `Stepper` + checkpoints + logging for one run folder."""

    def __init__(self, cfg: Config, out_dir: Path, resume: str | None = None, progress: bool = True) -> None:
        self.cfg, self.out_dir = cfg, out_dir
        requested = resolve_device(cfg.train.device)
        self.dist: DistInfo = init_distributed(requested.type)
        self.device = resolve_device(cfg.train.device, self.dist)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.stepper = Stepper(cfg, self.device, self.dist)
        task = self.stepper.task
        maker = ViewMaker(cfg, task.needs, self.stepper.tokenizer, task.student.visual.patch_size)
        self.data = build_train_data(cfg, maker, self.dist)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = total_steps_of(cfg, self.steps_per_epoch)
        self.stepper.set_span(self.steps_per_epoch, self.total_steps)
        self.bad_steps = 0
        self.ckpt_dir = out_dir / "checkpoints"
        if resume:
            self._resume(resume)
        self.stepper.wrap_distributed()
        self.logger = MetricsLogger(out_dir, self.total_steps, self.step, self.dist.is_main, progress=progress)
        if self.dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(dump_yaml(cfg))

    @property
    def step(self) -> int:
        return self.stepper.step

    # -- checkpoints -----------------------------------------------------------------------------

    def _resume(self, resume: str) -> None:
        if resume == "auto":
            path = ckpt.latest(self.ckpt_dir)
            if path is None:
                return
        else:
            path = Path(resume)
        state = ckpt.load(path, map_location=self.device)
        self.stepper.load_state_dict(state, f"checkpoint '{path}'")
        self.bad_steps = int(state.get("bad_steps", 0))

    def save(self, periodic: bool) -> Path:
        last = self.ckpt_dir / "last.pt"
        if not self.dist.is_main:
            return last
        state: dict[str, Any] = {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "config": to_dict(self.cfg),
            "git": ckpt.git_revision(),
            "epoch": self.step / self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "bad_steps": self.bad_steps,
            **self.stepper.state_dict(),
        }
        ckpt.save_atomic(state, last)
        if periodic:
            ckpt.save_atomic(state, self.ckpt_dir / f"step_{self.step:08d}.pt")
            ckpt.prune(self.ckpt_dir, self.cfg.train.keep_last)
        return last

    def fit(self) -> RunResult:
        cfg, spe = self.cfg, self.steps_per_epoch
        log_every, save_every = cfg.train.log_every, cfg.train.save_every or spe
        images_per_step = cfg.train.batch_size
        last: dict[str, float] = {}
        window = {"start": time.perf_counter(), "steps": 0, "data": 0.0, "errors": 0}
        try:
            while self.step < self.total_steps:
                epoch, in_epoch = divmod(self.step, spe)
                fetch_start = time.perf_counter()
                for batch in self.data.batches(epoch, in_epoch):
                    window["data"] += time.perf_counter() - fetch_start
                    window["errors"] += int(batch.pop("data_errors").sum())
                    batch.pop("index", None)
                    metrics = self.stepper.train_step(to_device(batch, self.device))
                    if metrics is None:
                        self._bad_step()
                    else:
                        self.bad_steps = 0
                    window["steps"] += 1
                    self.logger.advance()
                    if metrics is not None and (self.step % log_every == 0 or self.step == self.total_steps):
                        last = self._log(metrics, window, images_per_step)
                        window = {"start": time.perf_counter(), "steps": 0, "data": 0.0, "errors": 0}
                    if self.step % save_every == 0 or self.step == self.total_steps:
                        self.save(periodic=self.step % save_every == 0)
                    if self.step >= self.total_steps:
                        break
                    fetch_start = time.perf_counter()
        finally:
            self.logger.close()
        return RunResult(self.out_dir, self.step, self.ckpt_dir / "last.pt", last)

    def _bad_step(self) -> None:
        self.bad_steps += 1
        self.logger.message(
            f"step {self.step + 1}: non-finite loss or gradient, step skipped ({self.bad_steps} in a row)"
        )
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} consecutive non-finite steps at step {self.step + 1}; the last good checkpoint is in "
                f"{self.ckpt_dir}. Try a lower optim.lr, train.precision=bf16 or fp32, or a smaller optim.clip_grad."
            )

    def _log(
        self, metrics: dict[str, torch.Tensor], window: dict[str, float], images_per_step: int
    ) -> dict[str, float]:
        names = sorted(metrics)
        values = all_reduce_mean(torch.stack([metrics[n].float().reshape(()) for n in names])).tolist()
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        steps = max(window["steps"], 1)
        record: dict[str, float] = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "lr": self.stepper.schedules.lr(self.step - 1),
            "weight_decay": self.stepper.schedules.weight_decay(self.step - 1),
            "teacher_momentum": self.stepper.schedules.momentum(self.step - 1),
            **dict(zip(names, values)),
            "images_per_s": images_per_step * steps / elapsed,
            "images_per_s_per_device": images_per_step * steps / elapsed / self.dist.world_size,
            "step_time_s": elapsed / steps,
            "data_time_s": window["data"] / steps,
            "data_errors": window["errors"],
            "bad_steps": self.bad_steps,
        }
        self.logger.log(record)
        return record


def train(cfg: Config, out_dir: Path, resume: str | None = None, progress: bool = True) -> RunResult:
    trainer = Trainer(cfg, out_dir, resume, progress)
    try:
        return trainer.fit()
    finally:
        shutdown()
