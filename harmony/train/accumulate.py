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

Without batch-coupled objectives step 1 is skipped (plain accumulation of per-sample losses).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from harmony.data.views import split_batch
from harmony.objectives.base import Encoded, StepInfo

Scale = Callable[[torch.Tensor], torch.Tensor]


def random_state(device: torch.device) -> list[torch.Tensor]:
    """The generator states a forward pass draws from (CPU, and the device's when it is CUDA)."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])


def set_random_state(device: torch.device, state: list[torch.Tensor]) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def _concatenate(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([p[key] for p in pieces], dim=Encoded.batch_dim(key)) for key in pieces[0]}


def accumulated_step(
    call: Callable[..., Any],
    batch: dict[str, torch.Tensor],
    info: StepInfo,
    steps: int,
    autocast: Callable[[], AbstractContextManager[Any]],
    scale: Scale,
    device: torch.device,
    has_coupled: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one optimiser step in `steps` micro-batches; returns (loss, metrics) of the
    whole batch, as `call(batch, info)` would. `call` is the task's forward (through FSDP when sharded);
    `scale` the loss scaler's `scale` (cached gradients are of the scaled loss, so both parts match)."""
    micros = split_batch(batch, steps)
    total = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    cached: list[dict[str, torch.Tensor]] = [{} for _ in micros]
    states: list[list[torch.Tensor]] = []
    if has_coupled:
        pieces = []
        for micro in micros:
            states.append(random_state(device))
            with torch.no_grad(), autocast():
                pieces.append(call(micro, info, phase="cache"))
        leaves = {
            key: value.detach().requires_grad_(value.is_floating_point() and key != "images" and "teacher" not in key)
            for key, value in _concatenate(pieces).items()
        }
        del pieces
        with autocast():
            coupled_loss, coupled_metrics = call(batch, info, phase="coupled", outputs=leaves)
        scale(coupled_loss).backward()
        total = total + coupled_loss.detach()
        metrics.update(coupled_metrics)
        size = batch["global"].shape[1] // steps
        for key, leaf in leaves.items():
            if leaf.grad is not None:
                for i, grad in enumerate(leaf.grad.split(size, dim=Encoded.batch_dim(key))):
                    cached[i][key] = grad
        del leaves
    for i, micro in enumerate(micros):
        if states:  # the graph pass sees the random draws (drop path) of its cache pass
            set_random_state(device, states[i])
        with autocast():
            loss, micro_metrics, outputs = call(micro, info, phase="micro", full=batch)
        tensors = [outputs[key] for key in cached[i]]
        grads: list[torch.Tensor | None] = list(cached[i].values())
        if loss is not None:
            tensors.append(scale(loss))
            grads.append(None)
            total = total + loss.detach()
        if tensors:
            torch.autograd.backward(tensors, grads)
        for name, value in micro_metrics.items():
            metrics[name] = metrics[name] + value if name in metrics else value
        cached[i] = {}
    return total, metrics
