"""Teacher centring and sharpening (DINO/iBOT), shared by every self-distillation objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harmony.core.distributed import all_reduce_sum


def sharpen(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher targets softmax((t - c) / tau), in float32."""
    return F.softmax((teacher_logits.float() - center) / temperature, dim=-1)


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of H(p) = -sum p log p: the teacher-target entropy DINO monitors. Near log K the
    targets are uniform (nothing to learn yet, or collapse to uniform); near 0 they are one-hot."""
    if probs.numel() == 0:
        return probs.new_zeros(())
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()


def soft_cross_entropy(targets: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row CE(p, q) = -sum p log softmax(s / tau); returns one value per row."""
    return -(targets * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(dim=-1)


def soft_squared_error(targets: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row ||p - softmax(s / tau)||^2 summed over the K outputs: the MSE ablation of `soft_cross_entropy`."""
    return (F.softmax(student_logits.float() / temperature, dim=-1) - targets).square().sum(dim=-1)


class Center(nn.Module):
    """EMA of the all-reduced mean of raw teacher logits.

    `observe` records batch statistics (sum and count over every rank); several calls in one optimiser step
    (the micro-batches of gradient accumulation) add up, so the mean is that of the whole batch. `update`
    folds the mean in once per optimiser step (after the loss used the previous centre, as in DINO/iBOT).
    """

    value: torch.Tensor

    def __init__(self, dim: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("value", torch.zeros(1, dim))
        self._pending: torch.Tensor | None = None  # [sum over tokens (K values), token count]

    @torch.no_grad()
    def observe(self, logits: torch.Tensor) -> None:
        """logits [M, K] raw teacher outputs of the tokens that define the centre (any M, even 0)."""
        stats = torch.cat([logits.float().sum(dim=0), logits.new_tensor([logits.shape[0]], dtype=torch.float32)])
        stats = all_reduce_sum(stats)
        self._pending = stats if self._pending is None else self._pending + stats

    @torch.no_grad()
    def update(self) -> None:
        if self._pending is not None:
            stats, self._pending = self._pending, None
            mean = stats[:-1] / stats[-1].clamp(min=1.0)
            batch_mean = torch.where(stats[-1] > 0, mean, self.value[0]).unsqueeze(0)
            self.value.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)
