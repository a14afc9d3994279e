"""Exact gradient accumulation (`train.accum_steps` = K): one optimiser step over K micro-batches of each
rank's batch that gives the same loss and gradients as the whole batch at once.

The task's objectives say how they combine (`Objective.batch_coupled`, `micro_batch_share`); nothing here
knows any objective:

1. Batch-coupled objectives (a contrast over the batch, BatchNorm in a head: CLIP, SigLIP, SimCLR, MoCo v3,
   BYOL, ...) are computed once on the whole batch, GradCache-style (Gao et al. 2021): every micro-batch's
   tower outputs they read are computed without a graph ("cache"), concatenated, and the objectives' loss
   and its gradient with respect to those outputs are computed on the whole batch ("coupled"; heads,
   gathers over ranks, soft targets from the whole batch's teacher outputs, BatchNorm statistics: all as
   with K = 1).
2. Each micro-batch is then encoded again with a graph ("micro"), under the random state its cache pass
   had (drop path, dropout: the same function), and one backward pushes both the cached output gradients
   and the per-sample objectives' losses, each weighed by the micro-batch's share of the whole batch
   (iBOT per-image means, MLM's global masked-token count, ...). Centres sum their statistics over the
   micro-batches and are folded in once per optimiser step, with the EMA teachers, by the caller.

A frozen tower (`model.freeze`, or both towers before `model.freeze_until_step`) needs no gradient: its outputs
are cached in step 1 for every pass of the step (not only those the coupled objectives read), are no leaves
the coupled backward fills, and step 2 reuses them instead of running the tower again.

Without batch-coupled objectives step 1 is skipped (plain accumulation of per-sample losses); with K = 1 a step
is one pass over the whole batch (`PretrainTask.step_losses`).

Gradients are averaged over ranks by DDP for every K: its reducer all-reduces buckets while the backward still
runs (NCCL/gloo overlap), and it knows which parameters a backward left out. The passes go through the DDP
module (`call_pass`), every backward but a step's last under `no_sync` (gradients accumulate locally), and the
last one synchronises what all of them accumulated. (One explicit average after the backward would be one path
too, but would give up that overlap on every step.) Under FSDP (`harmony.train.sharding`) the task itself is the
wrapped module: every pass goes through its parameter gathering the same way, and each backward reduce-scatters.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harmony.data.views import split_batch
from harmony.objectives.base import Batch, Encoded, Needs, StepInfo
from harmony.train.freeze import towers_of
from harmony.train.task import PretrainTask, StepLosses, call_pass

# the student passes (`Needs` fields) each tower runs: the outputs made by one of them are that tower's alone
TOWER_PASSES = {
    "image": ("global_crops", "clean_crops", "local_crops", "dropped_crops"),
    "text": ("text_clean", "text_masked"),
}


def random_state(device: torch.device) -> list[torch.Tensor]:
    """The generator states a forward pass draws from (CPU, and the device's when it is CUDA)."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def set_random_state(device: torch.device, state: list[torch.Tensor]) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def tower_needs(needs: Needs, towers: Collection[str]) -> Needs:
    """`needs` with only the student passes of `towers` (no teacher, no joint-space embeddings; every recipe kept)."""
    blank = Needs()
    off = {name for tower, passes in TOWER_PASSES.items() if tower not in towers for name in passes}
    off |= {"teacher_crops", "teacher_text", "embeddings", "embeddings_dropped", "token_embeddings"}
    return dataclasses.replace(needs, **{name: getattr(blank, name) for name in off})


def frozen_towers(task: PretrainTask) -> list[str]:
    """The student towers none of whose parameters trains now."""
    return [word for word, tower in towers_of(task).items() if not any(p.requires_grad for p in tower.parameters())]


def _concatenate(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([p[key] for p in pieces], dim=Encoded.row(key).batch_dim) for key in pieces[0]}


class Accumulator:
    """One optimiser step's forward and backward over `steps` micro-batches of a task (module doc), owned by the
    stepper. Derived once from the task: what the batch-coupled objectives read (`coupled_needs`, and the flat
    outputs `coupled_keys` cached for the whole batch), and what the cache pass runs (`cache_needs`: only those
    passes, unless the student is stochastic; then every pass, so that its random draws are the graph pass's).
    The passes run under autocast to `amp_dtype` (None: fp32); losses are scaled by `scaler` before the backward
    (cached gradients are of the scaled loss, so both parts of the backward match)."""

    def __init__(
        self,
        task: PretrainTask,
        steps: int,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        scaler: torch.amp.GradScaler,
    ) -> None:
        self.task, self.steps, self.device, self.amp_dtype, self.scale = task, steps, device, amp_dtype, scaler.scale
        coupled = [objective.needs() for objective in task.enabled().values() if objective.batch_coupled]
        self.has_coupled = bool(coupled)
        self.coupled_needs = Needs.union_of(coupled)
        self.coupled_keys = Encoded.batched_keys(self.coupled_needs)
        self.cache_needs = self.coupled_needs if task.deterministic_student() else task.needs

    @property
    def last_backward_is_partial(self) -> bool:
        """Whether a step's last backward leaves out parameters an earlier one reached: those only the
        batch-coupled objectives use (their heads, the logit scale) get their gradient in the coupled pass. DDP
        must then look for them (`find_unused_parameters`) to average what they accumulated."""
        return self.steps > 1 and self.has_coupled

    def autocast(self) -> torch.autocast:
        """The passes' precision context."""
        amp = self.amp_dtype
        return torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], info: StepInfo) -> StepLosses:
        """Forward and backward of one optimiser step through `model` (the task, or DDP around it) on `batch` (a
        `Batch`); returns the whole batch's loss and metrics, as `PretrainTask.step_losses` gives them."""
        full = cast(Batch, batch)
        if self.steps == 1:
            with self.autocast():
                whole = call_pass(model, PretrainTask.step_losses, full, info)
            self.scale(whole.loss).backward()
            return whole
        local: Callable[[], AbstractContextManager[Any]] = (
            model.no_sync if isinstance(model, DistributedDataParallel) else contextlib.nullcontext
        )
        micros = [cast(Batch, micro) for micro in split_batch(batch, self.steps)]
        total = torch.zeros((), device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        cached: list[dict[str, torch.Tensor]] = [{} for _ in micros]
        given: list[dict[str, torch.Tensor]] = [{} for _ in micros]
        states: list[list[torch.Tensor]] = []
        if self.has_coupled:
            with local():
                coupled, cached, given, states = self._coupled(model, full, micros, info)
            total = total + coupled.loss.detach()
            metrics.update(coupled.metrics)
        for i, micro in enumerate(micros):
            if states:  # the graph pass sees the random draws (drop path) of its cache pass
                set_random_state(self.device, states[i])
            with local() if i < len(micros) - 1 else contextlib.nullcontext():
                loss, micro_metrics = self._micro(model, micro, full, info, cached[i], given[i])
            if loss is not None:
                total = total + loss.detach()
            for name, value in micro_metrics.items():
                metrics[name] = metrics[name] + value if name in metrics else value
            cached[i], given[i] = {}, {}
        return StepLosses(total, metrics)

    def _coupled(
        self, model: nn.Module, batch: Batch, micros: list[Batch], info: StepInfo
    ) -> tuple[StepLosses, list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], list[list[torch.Tensor]]]:
        """Step 1 (module doc): every micro-batch's cache pass, then the coupled losses and their backward on the
        whole batch; returns those losses, each micro-batch's share of the cached outputs' gradients and of the
        frozen towers' outputs, and the random state each cache pass started from."""
        needs, keys = self.cache_needs, set(self.coupled_keys)
        frozen: set[str] = set()
        if towers := frozen_towers(self.task):
            passes = {name for tower in towers for name in TOWER_PASSES[tower]}
            extra = tower_needs(self.task.needs, towers)
            needs = needs.union(extra)
            frozen = {key for key in Encoded.batched_keys(extra) if Encoded.row(key).made_by[0] in passes}
            keys |= frozen
        pieces = []
        states = []
        for micro in micros:
            states.append(random_state(self.device))
            with torch.no_grad(), self.autocast():
                pieces.append(call_pass(model, PretrainTask.cache_outputs, micro, needs, keys))
        leaves = {
            key: value.detach().requires_grad_(
                value.is_floating_point() and Encoded.row(key).trained and key not in frozen
            )
            for key, value in _concatenate(pieces).items()
        }
        del pieces
        with self.autocast():
            coupled = call_pass(model, PretrainTask.coupled_losses, batch, info, leaves, self.coupled_needs)
        self.scale(coupled.loss).backward()
        size = batch["global"].shape[1] // self.steps
        cached: list[dict[str, torch.Tensor]] = [{} for _ in micros]
        given: list[dict[str, torch.Tensor]] = [{} for _ in micros]
        for key, leaf in leaves.items():
            dim = Encoded.row(key).batch_dim
            if leaf.grad is not None:
                for i, grad in enumerate(leaf.grad.split(size, dim=dim)):
                    cached[i][key] = grad
            if key in frozen:
                for i, part in enumerate(leaf.split(size, dim=dim)):
                    given[i][key] = part
        return coupled, cached, given, states

    def _micro(
        self,
        model: nn.Module,
        micro: Batch,
        full: Batch,
        info: StepInfo,
        grads: dict[str, torch.Tensor],
        given: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Step 2 (module doc) for one micro-batch: its graph pass (frozen towers' outputs `given`) and one backward
        of the cached output gradients `grads` and its per-sample losses; returns those losses (unscaled) and their
        metrics."""
        with self.autocast():
            out = call_pass(model, PretrainTask.micro_losses, micro, full, info, tuple(grads), given)
        tensors = list(out.outputs.values())
        backward_grads: list[torch.Tensor | None] = list(grads.values())
        if out.loss is not None:
            tensors.append(self.scale(out.loss))
            backward_grads.append(None)
        if tensors:
            torch.autograd.backward(tensors, backward_grads)
        return out.loss, out.metrics
