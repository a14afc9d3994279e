"""Activation memory of a step, measured the same way on every device: the peak bytes of the tensors autograd
keeps for the backward (parameters excluded, each storage counted once while any saved view of it lives).

Process RSS mixes in the allocator's caching and the optimiser state; this number is what gradient
accumulation and activation checkpointing trade against time, so `harmony bench` reports it beside the
device's own peak (CUDA's `max_memory_allocated`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _Saved:
    """One tensor held for the backward; releases its storage's count when autograd frees it."""

    __slots__ = ("key", "owner", "tensor")

    def __init__(self, owner: SavedActivations, key: int, tensor: torch.Tensor) -> None:
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self) -> None:
        self.owner.release(self.key)


class SavedActivations:
    """`with SavedActivations(model) as saved: step()`; then `saved.peak_bytes`."""

    def __init__(self, model: nn.Module) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, saved references]
        self.current = 0
        self.peak_bytes = 0
        self._hooks: Any = None

    def pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or tensor.device.type == "meta":
            return tensor
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current)
        else:
            entry[1] += 1
        return _Saved(self, key, tensor)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __enter__(self) -> SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
