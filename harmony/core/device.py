"""The torch device a command asked for (`--device`, `train.device`): one place that reads `auto` and
refuses CUDA, in one line, on a machine without it."""

from __future__ import annotations

import torch

from harmony.core.distributed import DistInfo
from harmony.core.errors import ConfigError


def resolve_device(name: str, dist: DistInfo | None = None) -> torch.device:
    """`auto` is cuda when torch sees a GPU, else cpu; plain `cuda` is this process's GPU (its local rank);
    `cuda` or `cuda:N` on a machine without CUDA is a ConfigError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but this machine has no usable CUDA device; use cpu or auto")
    if name == "cuda":
        return torch.device("cuda", dist.local_rank if dist else 0)
    return torch.device(name)
