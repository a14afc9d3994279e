"""AdamW with two parameter groups: weight decay (scheduled) and none (biases, norms, tokens, tables)."""

from __future__ import annotations

import torch
from torch import nn

from harmony.config import OptimConfig


def no_decay_names(module: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: every 0/1-d tensor (biases, norms, scales) and the
    tables/tokens each submodule lists in its `no_weight_decay()` (timm's convention)."""
    names = {name for name, p in module.named_parameters() if p.ndim < 2}
    for prefix, sub in module.named_modules():
        listed = getattr(sub, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return names


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    exempt = no_decay_names(module)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "scheduled_wd": True},
        {"params": no_decay, "weight_decay": 0.0, "scheduled_wd": False},
    ]
    # Fused (CUDA and CPU): one kernel per group, and a device-side skip of non-finite steps.
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, eps=cfg.eps, fused=True, foreach=False)


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("scheduled_wd"):
            group["weight_decay"] = weight_decay
