"""PyTorch-distributed helpers, written once and used by every objective that needs a global batch.

`gather_with_grad` concatenates a tensor from every rank; its backward sums the incoming gradients
over ranks and hands each rank the slice of its own rows. With DDP's gradient averaging this makes
K ranks x B samples give the same gradients as 1 rank x K*B samples (tests check exactly that).
`all_reduce_sum_with_grad` is the same idea for a sum: its backward sums the incoming gradients over ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


# whether `init_distributed` started the process group, which `shutdown` then ends
_started_here = False


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun set up through the environment (no-op for one process). A group
    the caller already started (several runs in one process group) is used as it is."""
    global _started_here
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        _started_here = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def shutdown() -> None:
    """End the process group `init_distributed` started; one started by the caller is left to the caller."""
    global _started_here
    if _started_here and is_initialized():
        dist.destroy_process_group()
    _started_here = False


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.world, ctx.rank, ctx.rows = dist.get_world_size(), dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, in rank order; gradients flow back to the owner (summed over ranks)."""
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: every rank's output feeds every rank's loss, so the gradient
    of an input is the sum over ranks of the incoming gradients (the reasoning of `_GatherWithGrad`)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks that gradients flow through (batch statistics of a cross-rank BatchNorm)."""
    if world_size() == 1:
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (out of place, no gradient, on the tensor's device). NCCL only reduces CUDA
    tensors, so CPU tensors (log metrics, stop flags) travel through the current GPU there."""
    if world_size() == 1:
        return tensor
    device = tensor.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    out = tensor.detach().to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / world_size()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP parameters); any other tensor unchanged."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (grad norms, logit scale under FSDP); others unchanged."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def global_count(local_count: torch.Tensor) -> torch.Tensor:
    """Per-rank normaliser for a loss that sums over a variable number of items.

    A rank divides its local sum by (global count / world size); DDP's averaging then yields the
    global sum over the global count, whatever the per-rank counts are.
    """
    return (all_reduce_sum(local_count.float()) / world_size()).clamp(min=1.0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable: CPU tensors, lists), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
