"""The training loop: data, optimiser, precision, schedules, EMA, checkpoints and logging.

It knows nothing about individual objectives: the task returns a weighted loss and metrics, and
`task.after_step` advances teachers and centres once per optimiser step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harmony.config import Config, dump_yaml, to_dict, upgrade_keys
from harmony.core import checkpoint as ckpt
from harmony.core.device import resolve_device
from harmony.core.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    full,
    gather_objects,
    init_distributed,
    shutdown,
)
from harmony.core.errors import ConfigError
from harmony.data.guard import describe_skips
from harmony.data.loader import build_train_data
from harmony.data.views import ViewMaker
from harmony.train.logger import MetricsLogger
from harmony.train.preemption import StopRequest
from harmony.train.runfolder import claim
from harmony.train.step import Stepper, TrainingError
from harmony.train.watch import BestKeeper, Evaluation, EvaluationBuilder, preserved_rng, tower_weights
from harmony.typed import changed_keys
from harmony.weights.apply import InitSummary
from harmony.weights.resolve import open_init_source
from harmony.weights.source import Source


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    checkpoint: Path
    last_metrics: dict[str, float]
    data_summary: str = ""
    stopped_by: str | None = None
    is_main: bool = True

    def summary(self) -> str:
        loss = self.last_metrics.get("loss", float("nan"))
        how = f"stopped by {self.stopped_by} after" if self.stopped_by else "trained"
        return f"{how} {self.steps} steps, final loss {loss:.4f}; {self.data_summary}; checkpoint: {self.checkpoint}"


@dataclass
class _Window:
    """Counters between two log steps."""

    start: float = field(default_factory=time.perf_counter)
    fetch_start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    data: float = 0.0
    errors: int = 0
    mixed: torch.Tensor | None = None  # under mixing: [drawn, re-read] x sources


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def total_steps_of(cfg: Config, steps_per_epoch: int) -> int:
    """Run length: `train.max_steps` when set (schedules then span it), else epochs x steps per epoch."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


class Trainer:
    """Data + `Stepper` + checkpoints + logging for one run folder."""

    def __init__(
        self,
        cfg: Config,
        out_dir: Path,
        resume: str | None = None,
        progress: bool = True,
        overwrite: bool = False,
        init: Source | None = None,
        evaluation: EvaluationBuilder | None = None,
    ) -> None:
        self.cfg, self.out_dir = cfg, out_dir
        requested = resolve_device(cfg.train.device)
        self.dist: DistInfo = init_distributed(requested.type)
        self.lock = claim(out_dir, resume, overwrite) if self.dist.is_main else None
        try:
            self._build(resume, progress, init, evaluation)
        except BaseException:
            self._release()
            raise

    def _build(
        self, resume: str | None, progress: bool, init: Source | None, evaluation: EvaluationBuilder | None
    ) -> None:
        cfg, out_dir = self.cfg, self.out_dir
        self.device = resolve_device(cfg.train.device, self.dist)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.ckpt_dir = out_dir / "checkpoints"
        checkpoint = self._checkpoint(resume)
        if cfg.model.init and checkpoint is None and init is None:  # a run that never saved: start it again
            init = open_init_source(cfg.model.init, cfg.model.init_weights)
        self.stepper = Stepper(cfg, self.device, self.dist, init if checkpoint is None else None)
        task = self.stepper.task
        maker = ViewMaker(cfg, task.needs, self.stepper.tokenizer, task.student.visual.patch_size)
        self.data = build_train_data(cfg, maker, self.dist, self.device)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = total_steps_of(cfg, self.steps_per_epoch)
        self.stepper.set_span(self.steps_per_epoch, self.total_steps)
        self.stopped: str | None = None
        self._captions_checked = False
        if checkpoint is not None:
            self._resume(checkpoint)
        self.evaluation = self._start_evaluation(evaluation)
        self.best = self._best_keeper()
        self.logger = MetricsLogger(
            out_dir,
            self.total_steps,
            self.step,
            self.dist.is_main,
            progress=progress,
            label=cfg.name,
            wandb_project=cfg.train.wandb,
            config=to_dict(cfg),
        )
        if self.dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        if left_out := self.data.left_out():
            self.logger.message(left_out)
        if self.stepper.init_summary is not None:
            self._report_init(self.stepper.init_summary)
        if self.evaluation is not None:
            every = f"every {cfg.train.eval_every} steps and " if cfg.train.eval_every else ""
            self.logger.message(f"evaluating {', '.join(cfg.eval.tasks())} {every}at the end")

    def _start_evaluation(self, builder: EvaluationBuilder | None) -> Evaluation | None:
        """The run's evaluation (`eval` names data): its sets decoded now, before the first step, drawing no
        random number training would have drawn."""
        cfg = self.cfg
        if not cfg.eval.tasks():
            return None
        if builder is None:
            raise ConfigError(
                "config key 'train.eval_every' (with the eval section's data): evaluation during training runs under "
                "`harmony train`, which brings the evaluation code"
            )
        task = self.stepper.task
        towers = {"student": task.student.text is not None}
        if task.teacher is not None:
            towers["teacher"] = task.teacher.text is not None
        with preserved_rng(self.device):
            return builder(cfg, self.dist, self.device, towers)

    def _best_keeper(self) -> BestKeeper | None:
        """`train.keep_best`, checked against what the evaluation logs; the best so far (rank 0's `best.json`,
        so every rank decides alike when to save) when the run continues."""
        if not self.cfg.train.keep_best:
            return None
        keeper = BestKeeper(self.cfg.train.keep_best, self.cfg.train.keep_best_mode, self.out_dir)
        keeper.check_known(self.evaluation.metric_names() if self.evaluation is not None else [])
        keeper.best = gather_objects(keeper.best)[0]
        return keeper

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    @property
    def step(self) -> int:
        return self.stepper.step

    # -- checkpoints -----------------------------------------------------------------------------

    def _checkpoint(self, resume: str | None) -> Path | None:
        """The checkpoint this run continues from: `resume` itself, or with 'auto' the newest in the folder."""
        if resume == "auto":
            return ckpt.latest(self.ckpt_dir)
        return Path(resume) if resume else None

    def _resume(self, path: Path) -> None:
        state = ckpt.load(path, map_location=self.device)
        self.stepper.load_state_dict(state, f"checkpoint '{path}'")
        changes = changed_keys(upgrade_keys(state.get("config", {})), to_dict(self.cfg))
        if self.dist.is_main:
            changed = " with changed settings: " + "; ".join(changes) if changes else ""
            print(f"resuming {path} (step {self.step}){changed}", flush=True)

    def _report_init(self, summary: InitSummary) -> None:
        """Say what `--init` loaded, what starts fresh and what was left out; init.json in the run folder."""
        for line in summary.lines():
            self.logger.message(line)
        if self.dist.is_main:
            (self.out_dir / "init.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2) + "\n")

    def save(self, periodic: bool, last_too: bool = True, best: bool = False) -> Path:
        """`checkpoints/last.pt` (unless not `last_too`), `step_*.pt` when `periodic`, `best.pt` when `best`."""
        last = self.ckpt_dir / "last.pt"
        step_state = self.stepper.state_dict()  # a collective under FSDP: every rank takes part
        failure: ckpt.CheckpointWriteError | None = None
        if self.dist.is_main:
            try:
                self._write(step_state, last, periodic, last_too, best)
            except ckpt.CheckpointWriteError as err:
                failure = err
        # every rank learns whether the main one wrote: the others would wait in the next step's collectives
        failed = all_reduce_sum(torch.tensor([float(failure is not None)], device=self.device)).item()
        if failure is not None:
            raise failure
        if failed:
            raise ckpt.CheckpointWriteError(
                f"the checkpoint in '{self.ckpt_dir}' could not be written (rank 0 says why)"
            )
        return last

    def _write(self, step_state: dict[str, Any], last: Path, periodic: bool, last_too: bool, best: bool) -> None:
        """The main process's writing of `save`'s checkpoints."""
        state: dict[str, Any] = {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "config": to_dict(self.cfg),
            "git": ckpt.git_revision(),
            "epoch": self.step / self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            **step_state,
        }
        if last_too:
            ckpt.save_atomic(state, last)
        if best and self.best is not None:
            ckpt.save_atomic(state, self.ckpt_dir / "best.pt")
            self.best.record(self.step, self.ckpt_dir / "best.pt")
        if periodic:
            ckpt.save_atomic(state, self.ckpt_dir / f"step_{self.step:08d}.pt")
            ckpt.prune(self.ckpt_dir, self.cfg.train.keep_last)

    def fit(self) -> RunResult:
        """Train to `total_steps` (or until a stop signal: then save and return normally)."""
        spe = self.steps_per_epoch
        last: dict[str, float] = {}
        self.window = _Window()
        with StopRequest() as stop:
            try:
                while self.step < self.total_steps and not self.stopped:
                    epoch, in_epoch = divmod(self.step, spe)
                    for batch in self.data.batches(epoch, in_epoch):
                        last = self._one_step(batch) or last
                        if self.step >= self.total_steps:
                            break
                        if stop.requested(agree=self.step % self.cfg.train.log_every == 0):
                            self.stopped = stop.signal_name or "a signal on another rank"
                            self.save(periodic=False)
                            self.logger.message(
                                f"stopped by {self.stopped} after step {self.step}; checkpoint saved: resume with --resume auto"
                            )
                            break
                        self.window.fetch_start = time.perf_counter()
            finally:
                self.logger.close()
                self._release()
        return RunResult(
            self.out_dir,
            self.step,
            self.ckpt_dir / "last.pt",
            last,
            self._skip_summary(),
            self.stopped,
            self.dist.is_main,
        )

    def _skip_summary(self) -> str:
        """'data: skipped N samples (...)' over every rank, for the end of the run; under mixing, with what was
        drawn from each source."""
        totals = all_reduce_sum(torch.tensor([float(v) for v in self.data.skipped.values()])).long().tolist()
        summary = describe_skips(dict(zip(self.data.skipped, totals)))
        if (mixture := self.data.mixture) is not None and self.data.mixed is not None:
            summary += "; " + mixture.describe(all_reduce_sum(self.data.mixed))
        return summary

    def _warn_on_identical_captions(self, batch: dict[str, torch.Tensor]) -> None:
        """Once, on the first batch: captions that are all the same teach the image-text objectives nothing."""
        self._captions_checked = True
        text = batch.get("text")
        if text is not None and text.shape[0] > 1 and bool((text == text[:1]).all()):
            assert self.stepper.tokenizer is not None
            caption = self.stepper.tokenizer.decode(text[0])
            self.logger.message(
                f"warning: all {text.shape[0]} captions of the first batch read {caption!r}: a contrast between "
                "images and captions cannot tell them apart; if every caption of the data is the same, the "
                "image-text objectives learn nothing (`harmony data inspect` shows the captions)"
            )

    def _one_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
        if not self._captions_checked:
            self._warn_on_identical_captions(batch)
        cfg, window = self.cfg, self.window
        window.data += time.perf_counter() - window.fetch_start
        window.errors += int(batch.pop("data_errors").sum())
        if (mixed := batch.pop("data_sources", None)) is not None:
            window.mixed = mixed if window.mixed is None else window.mixed + mixed
        batch.pop("index", None)
        metrics = self.stepper.train_step(to_device(batch, self.device))
        window.steps += 1
        self.logger.advance()
        record = None
        final = self.step == self.total_steps
        if self.step % cfg.train.log_every == 0 or final:
            record = self._log(metrics)
            self.window = _Window()
            self._check_bad_steps(int(record["bad_steps_in_a_row"]))
        rows = [(record, True)] if record is not None else []
        if self.evaluation is not None and (final or (cfg.train.eval_every and self.step % cfg.train.eval_every == 0)):
            rows.append((self._evaluate(self.evaluation), False))
        best = self.best is not None and any([self.best.improves(row, training) for row, training in rows])
        save_every = cfg.train.save_every or self.steps_per_epoch
        due = self.step % save_every == 0 or final
        if due or best:
            self.save(periodic=self.step % save_every == 0, last_too=due, best=best)
        return record

    def _evaluate(self, evaluation: Evaluation) -> dict[str, float]:
        """An evaluation's row (`harmony.eval.during`): no random number is drawn from training's generators, and
        its time is left out of the next log step's throughput."""
        started = time.perf_counter()
        task = self.stepper.task
        with preserved_rng(self.device):
            values = evaluation(tower_weights({"student": task.student, "teacher": task.teacher}))
        seconds = time.perf_counter() - started
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **values}
        record["eval/time_s"] = seconds
        self.logger.log_eval(record)
        self.window.start += seconds
        return record

    def _check_bad_steps(self, in_a_row: int) -> None:
        """Skipped (non-finite) steps leave the weights untouched; too many in a row end the run."""
        if in_a_row:
            self.logger.message(f"step {self.step}: {in_a_row} non-finite step(s) in a row skipped")
        if in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"{in_a_row} consecutive non-finite steps up to step {self.step}; the last good checkpoint is in "
                f"{self.ckpt_dir}. Try a lower optim.lr, train.precision=bf16 or fp32, or a smaller optim.clip_grad."
            )

    def _log(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        window, images_per_step = self.window, self.cfg.train.batch_size
        names = sorted(metrics)
        values = all_reduce_mean(torch.stack([full(metrics[n]).float().reshape(()).cpu() for n in names])).tolist()
        errors = int(all_reduce_sum(torch.tensor([float(window.errors)])).item())
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        steps = max(window.steps, 1)
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
            "data_time_s": window.data / steps,
            "data_errors": errors,
            "bad_steps": int(self.stepper.bad_steps),
            "bad_steps_in_a_row": int(self.stepper.bad_in_a_row),
        }
        if (mixture := self.data.mixture) is not None:
            mixed = all_reduce_sum(window.mixed if window.mixed is not None else mixture.no_counts())
            record |= mixture.record(mixed)
            for line in mixture.ran_out(mixed):
                self.logger.message(line)
        self.logger.log(record)
        return record


def train(
    cfg: Config,
    out_dir: Path,
    resume: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    init: Source | None = None,
    evaluation: EvaluationBuilder | None = None,
) -> RunResult:
    """Train `cfg` into `out_dir`; `resume` is 'auto' or a checkpoint, `overwrite` starts a used folder over,
    `init` the source a new run starts from (else `model.init` is opened when the run starts fresh), `evaluation`
    builds the evaluation during training (`harmony.eval.during`; needed when the config's `eval` names data)."""
    trainer = Trainer(cfg, out_dir, resume, progress, overwrite, init, evaluation)
    try:
        return trainer.fit()
    finally:
        shutdown()
