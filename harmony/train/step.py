"""One optimisation step and the state it needs: task, optimiser, loss scaler, schedules, precision.

Shared by the training loop and the benchmark; knows nothing about data loading or logging.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from harmony.config import Config, ConfigError
from harmony.core.distributed import DistInfo
from harmony.core.errors import TrainingError
from harmony.models.global_batchnorm import to_global_batchnorm
from harmony.objectives.base import StepInfo
from harmony.objectives.registry import make_tokenizer
from harmony.train.accumulate import Accumulator
from harmony.train.freeze import Freezing, lr_scales
from harmony.train.optim import build_optimizer, clip_gradients, load_state_by_name, set_schedule
from harmony.train.schedules import Schedules
from harmony.train.task import PretrainTask
from harmony.weights.apply import InitSummary, initialise
from harmony.weights.source import Source


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def accumulation_steps(cfg: Config, dist: DistInfo) -> int:
    """`train.accum_steps`, checked against this rank's share of the global batch."""
    steps, per_rank = cfg.train.accum_steps, cfg.train.batch_size // max(dist.world_size, 1)
    if per_rank % steps:
        raise TrainingError(
            f"train.accum_steps={steps} does not divide the {per_rank} images each of the {dist.world_size} "
            f"process(es) gets of train.batch_size={cfg.train.batch_size}; choose a divisor of {per_rank}"
        )
    return steps


def check_batchnorm_accumulation(task: PretrainTask, steps: int) -> None:
    """Refuse gradient accumulation with BatchNorm in the image tower (a CNN's): each micro-batch would be
    normalised by its own statistics, so K micro-batches would not give the numbers of the whole batch."""
    if steps > 1 and any(isinstance(m, torch.nn.BatchNorm2d) for m in task.student.visual.modules()):
        raise ConfigError(
            f"config key 'train.accum_steps' ({steps}): the image tower {task.cfg.model.vision} has BatchNorm, whose "
            "statistics would be those of each micro-batch, not of the batch; use 1, or a CNN without BatchNorm "
            "(timm:convnext_tiny)"
        )


class Stepper:
    """Owns the task, its accumulator and its optimiser; `train_step(batch)` runs forward and backward (in
    `train.accum_steps` micro-batches, exactly: `harmony.train.accumulate`), clipping, the update, the
    logit-scale clamp, and the once-per-step EMA/centre advance."""

    def __init__(self, cfg: Config, device: torch.device, dist: DistInfo, init: Source | None = None) -> None:
        self.cfg, self.device, self.dist = cfg, device, dist
        torch.manual_seed(cfg.train.seed)
        self.tokenizer = make_tokenizer(cfg)
        task = PretrainTask(cfg, self.tokenizer)
        check_batchnorm_accumulation(task, cfg.train.accum_steps)
        # the weights a new run starts from, loaded before the task is moved, wrapped or sharded
        self.init_summary: InitSummary | None = initialise(task, init) if init is not None else None
        self.task = task.to(device)
        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.fsdp = cfg.train.strategy == "fsdp" and dist.world_size > 1
        self.step = 0
        self.bad_steps = torch.zeros((), dtype=torch.long, device=device)
        self.bad_in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.model: torch.nn.Module = self.task  # what the passes go through: the task, or DDP around it
        self.accumulator = Accumulator(self.task, accumulation_steps(cfg, dist), device, self.amp_dtype, self.scaler)
        self.set_span(steps_per_epoch=1, total_steps=1)
        self._prepare()

    def set_span(self, steps_per_epoch: int, total_steps: int) -> None:
        """Fix the schedules' time axis (epoch length and run length, in steps)."""
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.schedules = Schedules.from_config(self.cfg, steps_per_epoch, total_steps)

    def _prepare(self) -> None:
        """Freeze what `model.freeze` names (`harmony.train.freeze`), distribute the task (DDP over the whole task,
        every pass going through it, which averages the gradients whatever `train.accum_steps` is:
        `harmony.train.accumulate`; or FSDP units per tower), then build the optimiser over the final parameters
        and hold the towers when `model.freeze_until_step` says so."""
        self.freezing = Freezing(self.task, self.cfg)
        if self.dist.world_size > 1:
            # every BatchNorm (a CNN tower's, student and teacher, and the heads') over the global batch: SyncBN's
            # semantics on any device, gloo included
            to_global_batchnorm(self.task)
            if self.fsdp:
                from harmony.train.sharding import shard_task

                shard_task(self.task)
        trainable = self.task.student_modules()
        self.freezing.bind(trainable)
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        scales = lr_scales(trainable, self.cfg) if self.cfg.optim.layer_decay != 1.0 else None
        self.optimizer, self.param_names = build_optimizer(trainable, self.cfg.optim, scales)
        self.freezing.update(self.step)
        self._wrap()
        if self.cfg.train.compile:
            # in place: parameter names (EMA pairs, checkpoints, export) stay those of the eager module
            self.task.student.visual.compile()

    def _wrap(self) -> None:
        """DDP around the task over the parameters that train now (several processes, not FSDP). A wrapper built
        for other parameters (before `freeze_until_step`) is taken apart first, its hooks removed, and the new one
        broadcasts nothing: the ranks hold equal weights, and per-process buffers (BatchNorm statistics on CPU)
        stay their own."""
        if self.dist.world_size == 1 or self.fsdp:
            return
        old = self.model if isinstance(self.model, DistributedDataParallel) else None
        if old is not None:
            old._remove_autograd_hooks()
        self.model = DistributedDataParallel(
            self.task,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,
            find_unused_parameters=self.accumulator.last_backward_is_partial,
            init_sync=old is None,
        )

    @property
    def strategy(self) -> str:
        """How the optimiser state is kept, and saved: "fsdp" (sharded) or "plain"."""
        return "fsdp" if self.fsdp else "plain"

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (a collective under FSDP: call it on every rank)."""
        if self.fsdp:
            from harmony.train.sharding import full_state

            model, optim = full_state(self.task, self.optimizer)
        else:
            model, optim = self.task.state_dict(), self.optimizer.state_dict()
        names = {} if self.fsdp else {"optimizer_params": self.param_names}  # FSDP's state is keyed by name
        return {
            **names,
            "step": self.step,
            "bad_steps": int(self.bad_steps),
            "strategy": self.strategy,
            "model": model,
            "optimizer": optim,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
        }

    def load_state_dict(self, state: dict[str, Any], what: str) -> None:
        """Restore a checkpoint's training state (`what` names it in errors): weights of the whole task
        (student, teacher, objective heads and centres) strictly by key, the optimiser, the grad scaler,
        the RNG state and the step, so a resumed run continues as if uninterrupted. Refuses, with a
        `CheckpointError`, state saved under the other `train.strategy` (FSDP vs plain)."""
        from harmony.core.checkpoint import CheckpointError, check_state_keys, load_state_strict

        if state.get("strategy", "plain") != self.strategy:
            raise CheckpointError(
                f"{what} holds {state.get('strategy', 'plain')} optimiser state; this run is {self.strategy} "
                "(resume with the same train.strategy, or start a new run from its weights)"
            )
        self.step = int(state["step"])
        if self.freezing.update(self.step):  # what trains at that step, before FSDP's optimiser state is matched
            self._wrap()
        if self.fsdp:
            from harmony.train.sharding import load_full_state

            check_state_keys(self.task, state["model"], what)
            load_full_state(self.task, self.optimizer, state["model"], state["optimizer"])
        else:
            load_state_strict(self.task, state["model"], what)
            self._load_optimizer(state, what)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.bad_steps.fill_(int(state.get("bad_steps", 0)))

    def _load_optimizer(self, state: dict[str, Any], what: str) -> None:
        """The optimiser state of a plain checkpoint, by parameter name (`optimizer_params`; a checkpoint from
        before it was saved loads by position, and must then train the same parameters)."""
        from harmony.core.checkpoint import CheckpointError

        names = state.get("optimizer_params")
        if names is not None:
            load_state_by_name(self.optimizer, self.param_names, state["optimizer"], names)
            return
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise CheckpointError(
                f"{what} holds optimiser state for other parameters than this run trains ({exc}); resume with "
                "the settings it was trained with"
            ) from None

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimiser step. A non-finite loss or gradient skips the update on the device (fused
        AdamW's `found_inf`, as the fp16 loss scaler does), so no step waits for the host; the
        skips are counted in `bad_steps` / `bad_in_a_row` (device tensors read at log steps)."""
        info = StepInfo(self.step, self.steps_per_epoch)
        if self.freezing.update(self.step):  # the towers' warm-up ends (or a resumed run starts after it)
            self._wrap()
        set_schedule(self.optimizer, self.schedules.lr(self.step), self.schedules.weight_decay(self.step))
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.accumulator.step(self.model, batch, info)
        self.scaler.unscale_(self.optimizer)
        optim = self.cfg.optim
        grad_norm = clip_gradients(self.params, optim.clip_grad, optim.clip_mode, sharded=self.fsdp)
        for param in self.task.frozen_parameters(info):
            param.grad = None
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss.detach())
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the update itself when it finds inf/NaN
            self.scaler.update()
        else:
            self.optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
            self.optimizer.step()
        self.task.student.clamp_logit_scale()
        self.task.after_step(self.schedules.momentum(self.step))
        self.bad_in_a_row = torch.where(finite, 0, self.bad_in_a_row + 1)
        self.bad_steps = self.bad_steps + (~finite).long()
        self.step += 1
        metrics["loss"] = loss.detach()
        metrics["grad_norm"] = grad_norm.detach()
        return metrics
