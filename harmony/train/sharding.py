"""FSDP (PyTorch's `fully_shard`) for large models: parameters, gradients and optimiser state are
sharded over ranks; each tower is one unit whose parameters are gathered once per step
(`reshard_after_forward=False`, so the several student passes of a step reuse one gather).

Checkpoints stay plain: the full model state is gathered to rank 0 (the same keys as without FSDP,
so evaluation and export read them unchanged); the optimiser state is keyed by parameter name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harmony.train.task import PretrainTask


def shard_units(task: PretrainTask) -> list[nn.Module]:
    """Modules whose forward is called directly during a step, each becoming one FSDP unit."""
    units: list[nn.Module] = [task.student.visual]
    if task.student.text is not None:
        units.append(task.student.text)
    if task.teacher is not None:
        units.append(task.teacher.visual)
        if task.teacher.text is not None:
            units.append(task.teacher.text)
    for objective in task.objectives.values():
        units.extend(child for child in objective.children() if any(True for _ in child.parameters()))
    return units


def shard_task(task: PretrainTask) -> None:
    """One FSDP unit per `shard_units` module, and the task as the root unit for the parameters left (projections,
    the logit scale): FSDP gathers those around the task's `forward` only, which is why every pass of a step goes
    through it (`harmony.train.task.call_pass`)."""
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(task):
        fully_shard(unit, reshard_after_forward=False)
    fully_shard(task, reshard_after_forward=False)


def full_state(task: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimiser state), gathered in full on CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(task, options=options), get_optimizer_state_dict(task, optimizer, options=options)


def load_full_state(
    task: nn.Module, optimizer: torch.optim.Optimizer, model: dict[str, Any], optim: dict[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(task, model, options=StateDictOptions(full_state_dict=True))
    # Not strict: parameters that never had a gradient yet (the iBOT head's last layer is frozen in epoch 1, towers
    # held by `model.freeze_until_step` or unlocked on resume) legitimately have no AdamW state; the model keys were
    # checked strictly before. Those are hidden from the loader (requires_grad off while it runs): it gives every
    # trained parameter a state by a zero-gradient step first, which would start their step count at 1.
    names = {id(param): name for name, param in task.named_parameters()}
    hidden = [
        param
        for group in optimizer.param_groups
        for param in group["params"]
        if param.requires_grad and names.get(id(param)) not in optim["state"]
    ]
    for param in hidden:
        param.requires_grad_(False)
    try:
        set_optimizer_state_dict(task, optimizer, optim, options=StateDictOptions(full_state_dict=True, strict=False))
    finally:
        for param in hidden:
            param.requires_grad_(True)
