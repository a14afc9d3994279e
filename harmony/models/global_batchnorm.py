"""BatchNorm over the global batch: the batch statistics of every rank together (SyncBN that runs on any device).

In training mode, with n_r values per channel on rank r (rows, times the spatial positions of a feature map) and
N = sum_r n_r,
    mean = sum_r sum_i x_ri / N,    var = sum_r sum_i (x_ri - mean)^2 / N,
    y = (x - mean) / sqrt(var + eps) * weight + bias,
both sums through a differentiable all-reduce, so K ranks x B rows normalise (and back-propagate) exactly as
1 rank x K*B rows. torch's `SyncBatchNorm` refuses CPU tensors (gloo runs); these modules do not. Running
statistics and eval mode are `nn.BatchNorm1d`'s / `nn.BatchNorm2d`'s (unbiased running variance, same state-dict
names); at world size 1 they are those modules. Not `_BatchNorm` subclasses, so `convert_sync_batchnorm` leaves
them alone. `to_global_batchnorm` converts the BatchNorm1d/2d layers of a module (a CNN's, timm's `BatchNormAct2d`
included, and the BatchNorm of heads such as SimCLR's projector).
"""

from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d
from torch import nn

from harmony.core.distributed import all_reduce_sum_with_grad


class _GlobalBatchNorm(nn.Module):
    """Training-mode statistics over every dimension but the channels (dim 1), summed over all ranks."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    dims: int  # the input's number of dimensions

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
        if x.ndim != self.dims or x.shape[1] != self.num_features:
            layout = "B, C" if self.dims == 2 else "B, C, H, W"
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects [{layout}] with C = {self.num_features}, "
                f"got {tuple(x.shape)}"
            )
        values = x.float()
        if self.training:
            mean, var = self._global_statistics(values)
        else:
            mean, var = self.running_mean, self.running_var
        shape = (-1,) + (1,) * (self.dims - 2)
        out = (values - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None and self.bias is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    def _global_statistics(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, biased variance) over the values of every rank; updates the running statistics."""
        reduced = (0, *range(2, self.dims))
        per_channel = values.numel() // self.num_features
        count = values.new_full((1,), float(per_channel))
        sums = all_reduce_sum_with_grad(torch.cat([values.sum(dim=reduced), count]))
        total = sums[-1].detach()
        if per_channel < 2 and total.item() < 2:  # a host sync only on a rank with one value per channel
            raise ValueError(f"{type(self).__name__} needs more than one row (value) per channel in training mode")
        mean = sums[:-1] / total
        centred = values - mean.view((-1,) + (1,) * (self.dims - 2))
        var = all_reduce_sum_with_grad((centred**2).sum(dim=reduced)) / total
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * total / (total - 1), self.momentum)
        return mean, var


class GlobalBatchNorm1d(_GlobalBatchNorm):
    """`nn.BatchNorm1d` on [B, C] inputs whose training-mode statistics are those of the batch of all ranks."""

    dims = 2


class GlobalBatchNorm2d(_GlobalBatchNorm):
    """`nn.BatchNorm2d` on [B, C, H, W] feature maps whose training-mode statistics are those of all ranks;
    `after` (timm's `BatchNormAct2d`: its dropout and activation) runs on the normalised map."""

    dims = 4

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine)
        self.after: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(super().forward(x))


def _converted(norm: nn.BatchNorm1d | nn.BatchNorm2d) -> _GlobalBatchNorm:
    """A `GlobalBatchNorm1d`/`2d` holding `norm`'s own parameters (so their `requires_grad` and any reference to
    them stay) and running statistics."""
    if norm.running_mean is None or norm.running_var is None or norm.momentum is None:
        raise ValueError("a BatchNorm without running statistics or with a cumulative average is not converted")
    kind = GlobalBatchNorm2d if isinstance(norm, nn.BatchNorm2d) else GlobalBatchNorm1d
    out = kind(norm.num_features, norm.eps, norm.momentum, norm.affine)
    out.weight, out.bias = norm.weight, norm.bias
    out.running_mean, out.running_var = norm.running_mean, norm.running_var
    if norm.num_batches_tracked is not None:
        out.num_batches_tracked = norm.num_batches_tracked
    if isinstance(norm, BatchNormAct2d) and isinstance(out, GlobalBatchNorm2d):
        out.after = nn.Sequential(norm.drop, norm.act)
    return out.train(norm.training)


def to_global_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every `nn.BatchNorm1d` / `nn.BatchNorm2d` (and timm's `BatchNormAct2d`) replaced, in place, by
    a `GlobalBatchNorm1d` / `GlobalBatchNorm2d` holding its parameters and running statistics under the same
    state-dict names."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _converted(module)
    for name, child in module.named_children():
        setattr(module, name, to_global_batchnorm(child))
    return module
