"""Exact FLOPs of a training step, forward and backward, attributed to named components.

torch's `FlopCounterMode` attributes backward FLOPs through module hooks, which mislabels them when
independent branches (several tower passes, heads) interleave in the backward. Here every autograd
node created inside a component's forward is tagged with that component, and a node pre-hook
switches the attribution right before the node runs in the backward, so each backward op is charged
to the component whose forward created it. FLOP formulas are torch's (`flop_registry`), plus the CPU
flash-attention kernels torch's table lacks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

OTHER = "projections, losses, other"


def _cpu_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query.shape, key.shape, value.shape))


def _cpu_flash_backward(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> int:
    return int(sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape))


_EXTRA: dict[Any, Any] = {}
for _name, _fn in (
    ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward),
):
    if hasattr(torch.ops.aten, _name):
        _EXTRA[getattr(torch.ops.aten, _name)] = _fn


def _flops(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    packet = func._overloadpacket
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    if packet in _EXTRA:
        return int(_EXTRA[packet](*args, **kwargs))
    return 0


class _Count(TorchDispatchMode):
    def __init__(self, owner: ComponentFlops) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flops = _flops(func, args, kwargs, out)
        if flops:
            self.owner.charge(flops)
        return out


class _Tag(TorchFunctionMode):
    def __init__(self, owner: ComponentFlops) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.grad_fn is not None:
                self.owner.tag(leaf.grad_fn)
        return out


class ComponentFlops:
    """Context manager: `with ComponentFlops({"student ViT": [module], ...}) as c: step()`; then
    `c.flops[label]["forward" | "backward"]`, `c.total()`."""

    def __init__(self, components: Mapping[str, Iterable[nn.Module]]) -> None:
        self.components = {label: list(mods) for label, mods in components.items()}
        self.flops: dict[str, dict[str, int]] = defaultdict(lambda: {"forward": 0, "backward": 0})
        self._stack: list[str] = []
        self._backward: str | None = None
        self._tagged: set[Any] = set()
        self._handles: list[Any] = []

    def _current(self) -> str:
        if self._backward is not None:
            return self._backward
        return self._stack[-1] if self._stack else OTHER

    def charge(self, flops: int) -> None:
        self.flops[self._current()]["backward" if self._backward is not None else "forward"] += flops

    def tag(self, node: Any) -> None:
        """Tag `node` and any untagged nodes behind it (created inside composite ops) with the
        component running now, and hook them to switch the attribution in the backward."""
        label = self._current()
        todo = [node]
        while todo:
            n = todo.pop()
            if n is None or n in self._tagged or type(n).__name__ == "AccumulateGrad":
                continue
            self._tagged.add(n)
            self._handles.append(n.register_prehook(lambda grads, label=label: self._enter_backward(label)))
            todo.extend(fn for fn, _ in n.next_functions)

    def _enter_backward(self, label: str) -> None:
        self._backward = label

    def _push(self, label: str) -> None:
        self._backward = None
        self._stack.append(label)

    def _pop(self) -> None:
        self._stack.pop()

    def __enter__(self) -> ComponentFlops:
        self._backward = None
        for label, modules in self.components.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(lambda m, a, label=label: self._push(label)))
                self._handles.append(module.register_forward_hook(lambda m, a, o: self._pop()))
        self._modes = (_Tag(self), _Count(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tagged.clear()

    def total(self) -> int:
        return sum(v["forward"] + v["backward"] for v in self.flops.values())

    def by_component(self) -> dict[str, int]:
        """Forward + backward FLOPs per component, components in declaration order, `other` last."""
        order = [*self.components, OTHER]
        return {k: self.flops[k]["forward"] + self.flops[k]["backward"] for k in order if k in self.flops}
