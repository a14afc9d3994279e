"""Weighted k-NN classification on frozen CLS features (DINO's protocol, T = 0.07)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from harmony.core.colors import WHITE
from harmony.core.errors import ConfigError
from harmony.eval import settings
from harmony.eval.datasets import labelled_splits
from harmony.eval.features import cached_summaries
from harmony.eval.images import Colour, Skips
from harmony.eval.metrics import knn_scores, topk_accuracy
from harmony.eval.report import make_result
from harmony.loading import Pretrained


@dataclass(frozen=True)
class KnnSettings:
    ks: tuple[int, ...] = field(default=(10, 20, 100, 200), metadata={"help": "numbers of neighbours"})
    temperature: float = field(default=0.07, metadata={"help": "vote weight exp(sim / T)"})
    max_train: int = settings.max_train(5000)
    max_eval: int = settings.max_eval()
    batch_size: int = field(default=256, metadata={"help": "feature extraction batch"})


KNN_FULL = KnnSettings(max_train=0)


def check_ks(ks: tuple[int, ...]) -> None:
    """A non-positive (or no) k is a settings error, refused before any work."""
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"--ks needs positive numbers of neighbours, got {','.join(map(str, ks)) or 'none'}")


def neighbour_counts(ks: tuple[int, ...], num_train: int) -> list[int]:
    """The k values used: each requested k, capped at the number of training images (with a warning on
    stderr), duplicates dropped."""
    check_ks(ks)
    used: list[int] = []
    for k in ks:
        if k > num_train:
            print(
                f"harmony eval knn: warning: k={k} is more than the {num_train} training images; using k={num_train}",
                file=sys.stderr,
            )
        if min(k, num_train) not in used:
            used.append(min(k, num_train))
    return used


def knn_metrics(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    ks: list[int],
    temperature: float,
    num_classes: int,
) -> dict[str, float]:
    """`k<k>_top1` / `k<k>_top5` of weighted k-NN for each k: the (token summaries, labels) of the evaluation
    images against those of the training images, by their last CLS token (`harmony.eval.features`)."""
    train_cls = F.normalize(train[0][:, -2], dim=-1)
    test_cls = F.normalize(test[0][:, -2], dim=-1)
    metrics: dict[str, float] = {}
    for k in ks:
        votes = knn_scores(train_cls, train[1], test_cls, k, temperature, num_classes)
        acc = topk_accuracy(votes, test[1])
        metrics[f"k{k}_top1"], metrics[f"k{k}_top5"] = acc["top1"], acc["top5"]
    return metrics


def run_knn(
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    train_spec: str | None = None,
    cache_dir: Path | None = None,
    num_workers: int = 2,
    background: Colour = WHITE,
    **overrides: Any,
) -> dict[str, Any]:
    """Top-1/top-5 of weighted k-NN for each k (`k<k>_top1`, k capped at the training set's size):
    eval images against (a subset of) the training split."""
    started = time.perf_counter()
    s = settings.resolve(KnnSettings(), KNN_FULL, data_spec, overrides)
    check_ks(s.ks)
    splits = labelled_splits(pretrained.config, data_spec, train_spec, background, s.max_train, s.max_eval)
    extract: dict[str, Any] = {
        "device": device,
        "cache_dir": cache_dir,
        "batch_size": s.batch_size,
        "num_workers": num_workers,
        "skips": Skips(),
    }
    train_feats, train_labels = cached_summaries(pretrained, splits.train, **extract)
    test_feats, test_labels = cached_summaries(pretrained, splits.test, **extract)
    used = neighbour_counts(s.ks, len(train_labels))
    metrics = knn_metrics(
        (train_feats, train_labels), (test_feats, test_labels), used, s.temperature, splits.num_classes
    )
    metrics["chance"] = 1.0 / splits.num_classes
    dataset = {
        "spec": data_spec,
        "train": splits.train_spec,
        "num_train": len(train_labels),
        "num_images": len(test_labels),
        "num_classes": splits.num_classes,
        "skipped": extract["skips"].as_dict(),
    }
    return make_result("knn", pretrained, dataset, s, metrics, started, background, ks_used=used)
