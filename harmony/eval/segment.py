"""Semantic segmentation: mIoU, mean class accuracy and pixel accuracy, two protocols.

- `linear`: frozen backbone, BatchNorm + 1x1 convolution on the last block's patch tokens, logits
  upsampled bilinearly to the image (DINOv2's linear protocol).
- `fpn`: the heavier protocol, trained end to end: ViT -> simple feature pyramid (see `pyramid.py`)
  -> a semantic-FPN head (3x3 conv per level, upsampled to stride p/4 and summed, 1x1 classifier),
  AdamW with layer-wise lr decay 0.65 on the ViT, warm-up then cosine.
Both train for a number of iterations on random scale/crop/flip views and are scored on centre crops.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harmony.config import Config
from harmony.core.colors import WHITE
from harmony.core.errors import ConfigError
from harmony.data.errors import DataError
from harmony.eval import settings
from harmony.eval.datasets import default_train_spec, pick
from harmony.eval.images import Colour, SkippingLoader, Skips
from harmony.eval.metrics import confusion_matrix, segmentation_scores
from harmony.eval.optim import autocast, backbone_head_optimizer, warmup_schedule
from harmony.eval.pyramid import SimpleFeaturePyramid
from harmony.eval.report import make_result
from harmony.eval.segdata import IGNORE, MaskedImages, SegViews, open_segmentation
from harmony.eval.zeroshot import read_lines
from harmony.loading import Pretrained
from harmony.models.normalize import normalize
from harmony.models.vision import VisionTower

PROTOCOLS = ("linear", "fpn")


@dataclass(frozen=True)
class SegmentSettings:
    protocols: tuple[str, ...] = field(default=PROTOCOLS, metadata={"help": "linear and/or fpn"})
    linear_steps: int = field(default=300, metadata={"help": "iterations of the linear protocol"})
    fpn_steps: int = field(default=300, metadata={"help": "iterations of the FPN protocol"})
    batch_size: int = field(default=16, metadata={"help": "training batch"})
    linear_lr: float = field(default=1e-2, metadata={"help": "AdamW peak lr of the linear head"})
    fpn_lr: float = field(default=1e-3, metadata={"help": "AdamW peak lr of the FPN protocol (head; ViT decayed)"})
    layer_decay: float = settings.layer_decay(0.65)
    weight_decay: float = settings.weight_decay()
    warmup_steps: int = field(default=30, metadata={"help": "linear lr warm-up steps"})
    crop_size: int = field(default=0, metadata={"help": "square view size (0 = the checkpoint's image size)"})
    scale_range: tuple[float, ...] = field(default=(0.75, 1.5), metadata={"help": "training rescale range"})
    fpn_channels: int = field(default=64, metadata={"help": "feature pyramid width"})
    reduce_zero_label: bool = field(default=True, metadata={"help": "folders: mask 0 is ignored (ADE20K)"})
    class_names: str = field(default="", metadata={"help": "folders: file of class names"})
    max_train: int = settings.max_train(2000)
    max_eval: int = settings.max_eval()
    seed: int = settings.seed()


SEGMENT_FULL = SegmentSettings(
    linear_steps=40000,
    fpn_steps=160000,
    linear_lr=1e-3,
    fpn_lr=1e-4,
    warmup_steps=1500,
    crop_size=512,
    scale_range=(0.5, 2.0),
    fpn_channels=256,
    max_train=0,
)


def patch_map(visual: VisionTower, images: torch.Tensor) -> torch.Tensor:
    """Last-block patch tokens as a map [B, D, H/p, W/p]."""
    tokens = visual(images)[:, 1:]
    gh, gw = visual.grid(*images.shape[-2:])
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


class LinearHead(nn.Sequential):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm2d(dim), nn.Conv2d(dim, num_classes, kernel_size=1))


class FPNSegmenter(nn.Module):
    """Trainable ViT + simple feature pyramid + semantic-FPN head; logits at image resolution."""

    def __init__(self, visual: VisionTower, num_classes: int, channels: int) -> None:
        super().__init__()
        self.pyramid = SimpleFeaturePyramid(visual, channels)
        self.lateral = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
                )
                for _ in range(4)
            ]
        )
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def head_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.pyramid.scales, self.pyramid.fpn, self.lateral, self.classifier])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = list(self.pyramid(images).values())
        size = levels[0].shape[-2:]
        fused = torch.stack(
            [
                F.interpolate(conv(x), size, mode="bilinear", align_corners=False)
                for conv, x in zip(self.lateral, levels)
            ]
        ).sum(0)
        return F.interpolate(self.classifier(fused), images.shape[-2:], mode="bilinear", align_corners=False)


def _batches(
    views: SegViews, batch_size: int, num_workers: int, seed: int, skips: Skips
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled training batches, a new augmentation draw each pass; unreadable samples are
    counted in `skips` during the first pass (DataError when a pass yields no batch at all)."""
    for epoch in itertools.count():
        views.epoch = epoch
        loader: SkippingLoader[list[torch.Tensor]] = SkippingLoader(
            views,
            skips if epoch == 0 else Skips(),
            batch_size=min(batch_size, len(views)),
            shuffle=True,
            drop_last=True,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed + epoch),
        )
        produced = 0
        for images, masks in loader:
            produced += 1
            yield images, masks
        if not produced:
            raise DataError(f"no readable training image/mask pair in '{views.data.name}'")


def train_segmenter(
    predict: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    views: SegViews,
    steps: int,
    warmup: int,
    s: SegmentSettings,
    device: torch.device,
    num_workers: int,
    skips: Skips,
) -> list[float]:
    """`steps` AdamW updates of per-pixel cross-entropy; returns the loss every tenth of training."""
    schedule = warmup_schedule(optimizer, steps, warmup, min_lr=0.0)
    curve, running = [], []
    every = max(1, steps // 10)
    for step, (images, masks) in enumerate(_batches(views, s.batch_size, num_workers, s.seed, skips)):
        if step == steps:
            break
        schedule.step_update(step)
        with autocast(device):
            logits = predict(normalize(images.to(device)))
        loss = F.cross_entropy(logits.float(), masks.to(device), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % every == 0:
            curve.append(sum(running) / len(running))
            running = []
    return curve


@torch.no_grad()
def score(
    predict: Callable[[torch.Tensor], torch.Tensor],
    data: MaskedImages,
    size: int,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    skips: Skips,
) -> dict[str, float]:
    """mIoU, mAcc and pixel accuracy over the readable evaluation pairs (the others counted in `skips`)."""
    conf = torch.zeros(len(data.class_names), len(data.class_names), dtype=torch.long)
    views = SegViews(data, size, train=False)
    loader: SkippingLoader[list[torch.Tensor]] = SkippingLoader(
        views, skips, batch_size=batch_size, num_workers=num_workers
    )
    for images, masks in loader:
        pred = predict(normalize(images.to(device))).argmax(dim=1).cpu()
        conf += confusion_matrix(pred, masks, len(data.class_names), IGNORE)
    return segmentation_scores(conf)


def _restricted(data: MaskedImages, limit: int, seed: int) -> MaskedImages:
    index = pick(len(data), limit, seed)
    return MaskedImages(data.name, data.class_names, len(index), lambda i: data.get(index[i]))


def check_settings(s: SegmentSettings) -> None:
    """ValueError for an unknown protocol or an unusable rescale range, before any work."""
    unknown = set(s.protocols) - set(PROTOCOLS)
    if unknown or not s.protocols:
        raise ConfigError(f"unknown segmentation protocol(s) {sorted(unknown)}; use {PROTOCOLS}")
    if len(s.scale_range) != 2 or not 0 < s.scale_range[0] <= s.scale_range[1]:
        raise ConfigError(f"--scale-range needs two factors lo,hi with 0 < lo <= hi, got {s.scale_range}")


@dataclass
class SegmentSplits:
    """Training and evaluation pairs; `class_names` come from `--class-names` or the training split."""

    train_spec: str
    train: MaskedImages
    test: MaskedImages
    class_names: list[str]


def open_splits(
    cfg: Config, data_spec: str, train_spec: str | None, background: Colour, s: SegmentSettings
) -> SegmentSplits:
    """Both splits, each a fixed random subset (`max_train`, `max_eval`); the evaluation split is read with the
    training split's class names, so a folder's labels mean the same in both."""
    names = read_lines(s.class_names) if s.class_names else None
    train_spec = train_spec or default_train_spec(data_spec)
    opened = (s.reduce_zero_label, names, background)
    train = _restricted(open_segmentation(train_spec, cfg, *opened), s.max_train, s.seed)
    names = names or train.class_names
    opened = (s.reduce_zero_label, names, background)
    test = _restricted(open_segmentation(data_spec, cfg, *opened), s.max_eval, s.seed)
    return SegmentSplits(train_spec, train, test, names)


@dataclass
class ProtocolRun:
    """What every protocol trains on and is scored with; unreadable pairs are counted per protocol."""

    views: SegViews
    test: MaskedImages
    size: int
    settings: SegmentSettings
    device: torch.device
    num_workers: int
    train_skips: dict[str, Skips] = field(default_factory=dict)
    test_skips: dict[str, Skips] = field(default_factory=dict)

    def train_and_score(
        self,
        protocol: str,
        predict: Callable[[torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        steps: int,
        modules: nn.Module,
    ) -> tuple[list[float], dict[str, float]]:
        """(the training loss curve, the scores on the evaluation split) of one protocol."""
        self.train_skips[protocol], self.test_skips[protocol] = Skips(), Skips()
        curve = train_segmenter(
            predict,
            optimizer,
            self.views,
            steps,
            self.settings.warmup_steps,
            self.settings,
            self.device,
            self.num_workers,
            self.train_skips[protocol],
        )
        modules.eval()
        scores = score(predict, self.test, self.size, self.device, 64, self.num_workers, self.test_skips[protocol])
        return curve, scores


def linear_protocol(visual: VisionTower, num_classes: int, run: ProtocolRun) -> tuple[list[float], dict[str, float]]:
    """A BatchNorm + 1x1 convolution head on the frozen last-block patch tokens."""
    head = LinearHead(visual.embed_dim, num_classes).to(run.device).train()

    def linear(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = patch_map(visual, images)
        return F.interpolate(head(feats), images.shape[-2:], mode="bilinear", align_corners=False)

    optimizer = torch.optim.AdamW(head.parameters(), lr=run.settings.linear_lr, weight_decay=1e-4)
    return run.train_and_score("linear", linear, optimizer, run.settings.linear_steps, head)


def fpn_protocol(visual: VisionTower, num_classes: int, run: ProtocolRun) -> tuple[list[float], dict[str, float]]:
    """The ViT, a simple feature pyramid and a semantic-FPN head trained end to end (layer-decayed ViT lr)."""
    s = run.settings
    model = FPNSegmenter(visual, num_classes, s.fpn_channels).to(run.device).train()
    optimizer = backbone_head_optimizer(
        model.pyramid.vit, model.head_modules(), s.fpn_lr, s.weight_decay, s.layer_decay
    )
    return run.train_and_score("fpn", model, optimizer, s.fpn_steps, model)


def run_segment(
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    train_spec: str | None = None,
    num_workers: int = 2,
    background: Colour = WHITE,
    **overrides: Any,
) -> dict[str, Any]:
    """mIoU / mAcc / pixel accuracy of each protocol, as `<protocol>_<metric>`. Unreadable pairs are
    skipped; `dataset.skipped` counts those the first protocol met (the others read the same files)."""
    started = time.perf_counter()
    s = settings.resolve(SegmentSettings(), SEGMENT_FULL, data_spec, overrides)
    check_settings(s)
    torch.manual_seed(s.seed)
    splits = open_splits(pretrained.config, data_spec, train_spec, background, s)
    size = s.crop_size or pretrained.image_size
    views = SegViews(splits.train, size, train=True, scale=(s.scale_range[0], s.scale_range[1]))
    run = ProtocolRun(views, splits.test, size, s, device, num_workers)
    visual, num_classes = pretrained.model.vit(), len(splits.class_names)
    metrics: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    for protocol, train_protocol in (("linear", linear_protocol), ("fpn", fpn_protocol)):
        if protocol in s.protocols:
            curves[protocol], scores = train_protocol(visual, num_classes, run)
            metrics.update({f"{protocol}_{k}": v for k, v in scores.items()})
    first = s.protocols[0]  # every protocol reads the same files: report what the first one met
    skipped = Skips()
    skipped.merge(run.train_skips[first].as_dict())
    skipped.merge(run.test_skips[first].as_dict())
    dataset = {
        "spec": data_spec,
        "train": splits.train_spec,
        "num_train": len(splits.train) - len(run.train_skips[first]),
        "num_images": len(splits.test) - len(run.test_skips[first]),
        "num_classes": num_classes,
        "class_names": splits.class_names,
        "crop_size": size,
        "skipped": skipped.as_dict(),
    }
    return make_result("segment", pretrained, dataset, s, metrics, started, background, curve=curves)
