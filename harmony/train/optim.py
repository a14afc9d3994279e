"""AdamW with two parameter groups: weight decay (scheduled) and none (biases, norms, tokens, tables);
gradient clipping per parameter (DINO/iBOT/the authors) or over the global norm."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from harmony.config import OptimConfig
from harmony.core.distributed import all_reduce_sum, local


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


def clip_gradients(
    params: list[nn.Parameter], max_norm: float, mode: Literal["per_param", "global"], sharded: bool = False
) -> torch.Tensor:
    """Clip gradients in place; returns the global gradient norm before clipping (for logging and the
    non-finite check: one inf/NaN gradient makes it non-finite).

    `per_param`: each gradient whose own norm exceeds `max_norm` is scaled to `max_norm` (DINO's
    `clip_gradients`, coefficient max_norm / (norm + 1e-6)); `global`: every gradient is scaled by
    max_norm / (global norm + 1e-6) when the global norm exceeds it. `max_norm <= 0` only measures.
    `sharded` (FSDP): each rank holds a shard of every gradient, so the squared norms of the shards are
    summed over ranks first (one all-reduce): each parameter is clipped by its full norm, as without FSDP.
    No host synchronisation either way.
    """
    grads = [local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    squares = torch.stack(torch._foreach_norm(grads)).float().pow(2)
    if sharded:
        squares = all_reduce_sum(squares)
    norms = squares.sqrt()
    total = squares.sum().sqrt()
    if max_norm > 0:
        norm = norms if mode == "per_param" else total.expand_as(norms)
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coef.unbind(), grads)])
    return total
