"""Optimiser and schedule for the protocols that train a backbone (fine-tune, segmentation, detection).

BEiT-style layer-wise lr decay for the ViT (timm's `param_groups_layer_decay`: block i gets
decay^(depth + 1 - i), the patch embedding the smallest scale), full lr for the task head, AdamW, and
timm's step-based schedulers (linear warm-up, then cosine or step decay), which apply each group's
`lr_scale`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn


def backbone_head_optimizer(
    vit: VisionTransformer, head: nn.Module, lr: float, weight_decay: float, layer_decay: float
) -> torch.optim.Optimizer:
    """AdamW over the ViT (layer-decayed lr) and a task head (full lr); no decay on norms and biases."""
    groups = param_groups_layer_decay(
        vit, weight_decay=weight_decay, no_weight_decay_list=vit.no_weight_decay(), layer_decay=layer_decay
    )
    for group in param_groups_weight_decay(head, weight_decay=weight_decay):
        groups.append({**group, "lr_scale": 1.0})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    min_lr: float = 1e-6,
    decay_at: Sequence[float] = (),
) -> Scheduler:
    """Linear warm-up, then cosine to `min_lr`, or (with `decay_at`, fractions of training) x0.1 steps.

    Call `step_update(n)` before update n (n = 0, 1, ...)."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    if decay_at:
        return MultiStepLRScheduler(
            optimizer,
            decay_t=[round(f * total_steps) for f in decay_at],
            decay_rate=0.1,
            warmup_t=warmup,
            warmup_lr_init=1e-6,
            t_in_epochs=False,
        )
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=1e-6,
        warmup_prefix=False,
        t_in_epochs=False,
    )


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on a GPU, a no-op context on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
