"""AdamW with two parameter groups, weight decay (scheduled) and none (biases, norms, tokens, tables), per lr
scale (`optim.layer_decay`: one pair of groups per layer of the towers; 1.0 gives the one pair); gradient
clipping per parameter (DINO/iBOT/the authors) or over the global norm."""

from __future__ import annotations

from typing import Any, Literal

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


def build_optimizer(
    module: nn.Module, cfg: OptimConfig, lr_scales: dict[str, float] | None = None
) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over the parameters of `module` that require a gradient, and their names in the optimiser's order
    (for its state by name: `load_state_by_name`). `lr_scales` (by name, default 1) multiply the scheduled lr: a pair
    of groups (decay, no decay) per scale, largest first; scale 1's pair is always there."""
    exempt = no_decay_names(module)
    scales = lr_scales or {}
    members: dict[tuple[float, bool], list[tuple[str, nn.Parameter]]] = {(1.0, True): [], (1.0, False): []}
    for name, param in module.named_parameters():
        if param.requires_grad:
            members.setdefault((scales.get(name, 1.0), name not in exempt), []).append((name, param))
    groups, names = [], []
    for (scale, decay), named in sorted(members.items(), key=lambda item: (-item[0][0], not item[0][1])):
        group = {"params": [p for _, p in named], "weight_decay": cfg.weight_decay if decay else 0.0}
        groups.append({**group, "scheduled_wd": decay, "lr_scale": scale})
        names += [name for name, _ in named]
    # Fused (CUDA and CPU): one kernel per group, and a device-side skip of non-finite steps.
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, eps=cfg.eps, fused=True, foreach=False), names


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """The step's lr (times each group's `lr_scale`) and weight decay (in the groups that decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("scheduled_wd"):
            group["weight_decay"] = weight_decay


def load_state_by_name(
    optimizer: torch.optim.Optimizer, names: list[str], saved: dict[str, Any], saved_names: list[str]
) -> None:
    """Load `saved` (an optimiser `state_dict` whose parameters were `saved_names`, in its order) into `optimizer`
    (parameters `names`) by parameter name: a parameter without saved state starts as new, saved state of a
    parameter no longer trained is dropped; the groups' settings (lr scale, weight decay, betas) stay the
    optimiser's own, from the config."""
    by_name = {saved_names[int(i)]: state for i, state in saved["state"].items()}
    current = optimizer.state_dict()
    current["state"] = {i: by_name[name] for i, name in enumerate(names) if name in by_name}
    optimizer.load_state_dict(current)


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
