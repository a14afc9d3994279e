"""Linear probing on frozen features, DINOv2 style.

Features are extracted once (and cached, see `features.py`). Then many linear heads, one per
(learning rate x input configuration), train together in one pass over the cached features: SGD with
momentum 0.9, no weight decay, cosine schedule, lr scaled by batch / 256. Input configurations are the
CLS of the last n blocks, optionally with the average-pooled patch tokens. The head with the best
accuracy on a held-out part of the training split is reported on the evaluation split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harmony.core.colors import WHITE
from harmony.core.errors import ConfigError
from harmony.eval import settings
from harmony.eval.datasets import labelled_splits, pick
from harmony.eval.features import cached_summaries, linear_input
from harmony.eval.images import Colour, Skips
from harmony.eval.metrics import topk_accuracy
from harmony.eval.report import make_result
from harmony.loading import Pretrained

POOLINGS = ("cls", "cls+avg")


@dataclass(frozen=True)
class LinearSettings:
    epochs: int = field(default=30, metadata={"help": "passes over the cached training features"})
    batch_size: int = field(default=256, metadata={"help": "training batch"})
    lrs: tuple[float, ...] = field(
        default=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1),
        metadata={"help": "learning rates swept (per 256 images)"},
    )
    n_last_blocks: tuple[int, ...] = field(default=(1, 4), metadata={"help": "CLS of the last n blocks"})
    pooling: tuple[str, ...] = field(default=POOLINGS, metadata={"help": "'cls' and/or 'cls+avg' (patch mean)"})
    heldout_fraction: float = field(default=0.1, metadata={"help": "share of training images held out"})
    max_train: int = settings.max_train(5000)
    max_eval: int = settings.max_eval()
    seed: int = settings.seed()


LINEAR_FULL = LinearSettings(epochs=100, batch_size=1024, max_train=0)


@dataclass(frozen=True)
class HeadSpec:
    n_blocks: int
    pooling: str
    lr: float


def head_specs(s: LinearSettings, available_blocks: int) -> list[HeadSpec]:
    """The sweep grid; block counts above what the cache holds are capped (and deduplicated)."""
    for p in s.pooling:
        if p not in POOLINGS:
            raise ConfigError(f"pooling '{p}' is not one of {POOLINGS}")
    blocks = sorted({min(n, available_blocks) for n in s.n_last_blocks})
    return [HeadSpec(n, p, lr) for n in blocks for p in s.pooling for lr in s.lrs]


class HeadBank(nn.Module):
    """H independent linear heads on one input, as one [H, D, C] weight (one batched matmul)."""

    def __init__(self, heads: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(heads, dim, num_classes) * 0.01)
        self.bias = nn.Parameter(torch.zeros(heads, 1, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D] -> logits [H, B, C]."""
        return torch.einsum("bd,hdc->hbc", x, self.weight) + self.bias


def train_heads(
    inputs: dict[tuple[int, str], torch.Tensor],
    labels: torch.Tensor,
    specs: list[HeadSpec],
    num_classes: int,
    epochs: int,
    batch_size: int,
    seed: int = 0,
) -> list[tuple[HeadBank, list[HeadSpec]]]:
    """All heads trained in the same pass over the features, each with its own learning rate.

    With momentum SGD and no weight decay, a step with lr_h on gradient g equals a step with lr 1 on
    lr_h * g, so each bank scales its heads' gradients by their lr and one optimiser drives them all.
    """
    torch.manual_seed(seed)
    banks = []
    for config in dict.fromkeys((h.n_blocks, h.pooling) for h in specs):
        members = [h for h in specs if (h.n_blocks, h.pooling) == config]
        banks.append((config, HeadBank(len(members), inputs[config].shape[1], num_classes), members))
    scales = [torch.tensor([h.lr * batch_size / 256 for h in m]).view(-1, 1, 1) for _, _, m in banks]
    optimizer = torch.optim.SGD([p for _, bank, _ in banks for p in bank.parameters()], lr=1.0, momentum=0.9)
    steps_per_epoch = max(1, -(-len(labels) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            for config, bank, members in banks:
                logits = bank(inputs[config][batch])
                target = labels[batch].repeat(len(members))
                (F.cross_entropy(logits.flatten(0, 1), target) * len(members)).backward()
            for (_, bank, _), scale in zip(banks, scales):
                for p in bank.parameters():
                    assert p.grad is not None
                    p.grad.mul_(scale)
            optimizer.step()
            schedule.step()
    return [(bank, members) for _, bank, members in banks]


def run_linear(
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    train_spec: str | None = None,
    cache_dir: Path | None = None,
    num_workers: int = 2,
    background: Colour = WHITE,
    **overrides: Any,
) -> dict[str, Any]:
    """Linear-probe top-1/top-5 of the head chosen on held-out training images; the full sweep in `sweep`."""
    started = time.perf_counter()
    s = settings.resolve(LinearSettings(), LINEAR_FULL, data_spec, overrides)
    splits = labelled_splits(pretrained.config, data_spec, train_spec, background, s.max_train, s.max_eval, s.seed)
    num_classes = splits.num_classes
    skips = Skips()
    extract: dict[str, Any] = {
        "device": device,
        "cache_dir": cache_dir,
        "batch_size": 256,
        "num_workers": num_workers,
        "skips": skips,
    }
    train_feats, train_labels = cached_summaries(pretrained, splits.train, **extract)
    test_feats, test_labels = cached_summaries(pretrained, splits.test, **extract)
    heldout = torch.tensor(pick(len(train_labels), max(1, round(s.heldout_fraction * len(train_labels))), s.seed + 1))
    fit = torch.ones(len(train_labels), dtype=torch.bool)
    fit[heldout] = False
    specs = head_specs(s, train_feats.shape[1] - 1)
    configs = {(h.n_blocks, h.pooling) for h in specs}
    inputs = {c: linear_input(train_feats, c[0], c[1] == "cls+avg") for c in configs}
    test_inputs = {c: linear_input(test_feats, c[0], c[1] == "cls+avg") for c in configs}
    heads = train_heads(
        {c: x[fit] for c, x in inputs.items()}, train_labels[fit], specs, num_classes, s.epochs, s.batch_size, s.seed
    )
    sweep = []
    with torch.no_grad():
        for bank, members in heads:
            key = (members[0].n_blocks, members[0].pooling)
            held_logits, test_logits = bank(inputs[key][heldout]), bank(test_inputs[key])
            for h, spec in enumerate(members):
                held = topk_accuracy(held_logits[h], train_labels[heldout])["top1"]
                sweep.append({**spec.__dict__, "heldout_top1": held, **topk_accuracy(test_logits[h], test_labels)})
    best = max(sweep, key=lambda r: r["heldout_top1"])
    metrics = {
        "top1": best["top1"],
        "top5": best["top5"],
        "heldout_top1": best["heldout_top1"],
        "chance": 1.0 / num_classes,
    }
    dataset = {
        "spec": data_spec,
        "train": splits.train_spec,
        "num_train": int(fit.sum()),
        "num_heldout": len(heldout),
        "num_images": len(test_labels),
        "num_classes": num_classes,
        "skipped": skips.as_dict(),
    }
    selected = {k: best[k] for k in ("n_blocks", "pooling", "lr")}
    return make_result("linear", pretrained, dataset, s, metrics, started, background, selected=selected, sweep=sweep)
