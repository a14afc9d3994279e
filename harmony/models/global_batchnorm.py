"""BatchNorm over the global batch: the batch statistics of every rank together (SyncBN that runs on any device).

In training mode, with n_r rows on rank r and N = sum_r n_r,
    mean = sum_r sum_i x_ri / N,    var = sum_r sum_i (x_ri - mean)^2 / N,
    y = (x - mean) / sqrt(var + eps) * weight + bias,
both sums through a differentiable all-reduce, so K ranks x B rows normalise (and back-propagate) exactly as
1 rank x K*B rows. torch's `SyncBatchNorm` refuses CPU tensors (gloo runs); this module does not. Running
statistics and eval mode are `nn.BatchNorm1d`'s (unbiased running variance, same state-dict names); at world
size 1 it is `nn.BatchNorm1d`. Not a `_BatchNorm` subclass, so `convert_sync_batchnorm` leaves it alone.
"""

from __future__ import annotations

import torch
from torch import nn

from harmony.core.distributed import all_reduce_sum_with_grad


class GlobalBatchNorm1d(nn.Module):
    """`nn.BatchNorm1d` on [B, C] inputs whose training-mode statistics are those of the batch of all ranks."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.weight: nn.Parameter | None = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"GlobalBatchNorm1d({self.num_features}) expects [B, {self.num_features}], got {tuple(x.shape)}"
            )
        values = x.float()
        if self.training:
            mean, var = self._global_statistics(values)
        else:
            mean, var = self.running_mean, self.running_var
        out = (values - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None and self.bias is not None:
            out = out * self.weight + self.bias
        return out.to(x.dtype)

    def _global_statistics(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) over the rows of every rank; updates the running statistics."""
        count = values.new_full((1,), float(values.shape[0]))
        sums = all_reduce_sum_with_grad(torch.cat([values.sum(dim=0), count]))
        total = sums[-1].detach()
        if values.shape[0] < 2 and total.item() < 2:  # a host sync only on a one-row rank
            raise ValueError("GlobalBatchNorm1d needs more than one row per channel in training mode")
        mean = sums[:-1] / total
        var = all_reduce_sum_with_grad(((values - mean) ** 2).sum(dim=0)) / total
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * total / (total - 1), self.momentum)
        return mean, var
