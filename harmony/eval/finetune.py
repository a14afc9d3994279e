"""Full fine-tuning of the pre-trained vision tower for classification (BEiT/iBOT protocol).

A timm `VisionTransformer` of the same architecture gets the tower's weights, a new linear head and
drop-path; AdamW with layer-wise lr decay (0.65) and weight decay 0.05 (timm's
`create_optimizer_v2`), linear warm-up then cosine, random-resized-crop + flip, label smoothing and
optional mixup/cutmix (timm's `Mixup`). Average pooling of patch tokens with the pre-trained final
norm moved to `fc_norm`, as BEiT does, or the CLS token. A CNN tower is fine-tuned as its own timm model with
a new classifier (its global pooling; `pool` does not apply).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from torch import nn

from harmony.core.colors import WHITE
from harmony.core.errors import ConfigError
from harmony.eval import settings
from harmony.eval.datasets import EvalViews, LabelledImages, extract, labelled_splits
from harmony.eval.images import Colour, SkippingLoader, Skips
from harmony.eval.metrics import topk_accuracy
from harmony.eval.optim import autocast, warmup_schedule
from harmony.eval.report import make_result
from harmony.loading import Pretrained
from harmony.models.cnn import CNNTower, create_cnn
from harmony.models.normalize import normalize
from harmony.models.vision import VisionTower, timm_kwargs


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=64, metadata={"help": "training batch"})
    lr: float = field(default=1e-2, metadata={"help": "peak lr per 256 images"})
    min_lr: float = field(default=1e-6, metadata={"help": "lr at the end of the cosine schedule"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up"})
    layer_decay: float = settings.layer_decay(0.65)
    weight_decay: float = settings.weight_decay()
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth rate"})
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha (0 = off)"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix alpha (0 = off)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "cross-entropy label smoothing"})
    crop_scale: tuple[float, ...] = field(default=(0.5, 1.0), metadata={"help": "random-resized-crop area range"})
    pool: str = field(default="avg", metadata={"help": "avg (patch mean + fc_norm) or token (CLS)"})
    max_train: int = settings.max_train(2000)
    max_eval: int = settings.max_eval()
    seed: int = settings.seed()


FINETUNE_FULL = FinetuneSettings(
    epochs=100,
    batch_size=1024,
    lr=5e-4,
    warmup_epochs=20.0,
    mixup=0.8,
    cutmix=1.0,
    crop_scale=(0.08, 1.0),
    max_train=0,
)


def classifier_from(visual: VisionTower, num_classes: int, drop_path: float, pool: str) -> VisionTransformer:
    """A trainable timm ViT classifier initialised from the tower; only the head starts fresh."""
    if pool not in ("avg", "token"):
        raise ConfigError(f"pool must be 'avg' or 'token', not '{pool}'")
    src = visual.vit
    model = VisionTransformer(
        img_size=src.patch_embed.img_size,
        **timm_kwargs(visual.spec),
        num_classes=num_classes,
        global_pool="avg" if pool == "avg" else "token",
        dynamic_img_size=True,
        drop_path_rate=drop_path,
    )
    state = {k: v.detach().clone() for k, v in src.state_dict().items() if not k.startswith("head.")}
    if pool == "avg":
        state = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != {"head.weight", "head.bias"} or unexpected:
        raise RuntimeError(f"weights do not fit the classifier: missing {missing}, unexpected {unexpected}")
    head = model.head
    assert isinstance(head, nn.Linear)
    nn.init.trunc_normal_(head.weight, std=2e-5)
    nn.init.zeros_(head.bias)
    return model


def cnn_classifier(visual: CNNTower, num_classes: int, drop_path: float) -> nn.Module:
    """The CNN tower's timm model with a fresh `num_classes` classifier (the only tensors not loaded)."""
    model = create_cnn(visual.spec, drop_path)
    model.reset_classifier(num_classes)  # type: ignore[operator]
    missing, unexpected = model.load_state_dict(visual.net.state_dict(), strict=False)
    if unexpected or not all(name.rsplit(".", 1)[-1] in ("weight", "bias") for name in missing) or len(missing) > 2:
        raise RuntimeError(f"weights do not fit the classifier: missing {missing}, unexpected {unexpected}")
    return model


def train_transform(size: int, scale: tuple[float, ...]) -> T.Compose:
    return T.Compose(
        [
            T.PILToTensor(),
            T.RandomResizedCrop(size, scale=(scale[0], scale[1]), antialias=True),
            T.RandomHorizontalFlip(),
        ]
    )


def fit_classifier(
    model: nn.Module,
    train: LabelledImages,
    s: FinetuneSettings,
    image_size: int,
    device: torch.device,
    num_workers: int,
    skips: Skips | None = None,
) -> list[float]:
    """Train in place; returns the mean training loss of each epoch. Unreadable training images are
    counted in `skips` (once, in the first epoch) and left out."""
    num_classes = len(train.class_names)
    batch = min(s.batch_size, len(train))
    batch -= batch % 2  # timm's Mixup needs an even batch
    first_epoch = Skips()
    loader: SkippingLoader[list[torch.Tensor]] = SkippingLoader(
        EvalViews(train, image_size, train_transform(image_size, s.crop_scale)),
        first_epoch,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(s.seed),
    )
    mixing = s.mixup > 0 or s.cutmix > 0
    mixup = Mixup(s.mixup, s.cutmix, label_smoothing=s.label_smoothing, num_classes=num_classes) if mixing else None
    soft_ce = SoftTargetCrossEntropy()
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=s.lr * batch / 256, weight_decay=s.weight_decay, layer_decay=s.layer_decay
    )
    steps = s.epochs * len(loader)
    schedule = warmup_schedule(optimizer, steps, round(s.warmup_epochs * len(loader)), s.min_lr)
    model.to(device).train()
    curve, update = [], 0
    for epoch in range(s.epochs):
        total = 0.0
        for images, labels in loader:
            if len(labels) % 2 and mixup is not None:  # a skipped image left the batch odd
                images, labels = images[1:], labels[1:]
            if len(labels) == 0:
                continue
            schedule.step_update(update)
            x, y = normalize(images.to(device)), labels.to(device)
            with autocast(device):
                if mixup is not None:
                    x, soft = mixup(x, y)
                    loss = soft_ce(model(x), soft)
                else:
                    loss = F.cross_entropy(model(x), y, label_smoothing=s.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            update += 1
        curve.append(total / max(len(loader), 1))
        if epoch == 0 and skips is not None:
            skips.merge(first_epoch.as_dict())
    return curve


def run_finetune(
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    train_spec: str | None = None,
    num_workers: int = 2,
    background: Colour = WHITE,
    **overrides: Any,
) -> dict[str, Any]:
    """Top-1/top-5 on the evaluation split after fine-tuning the whole tower on the training split."""
    started = time.perf_counter()
    s = settings.resolve(FinetuneSettings(), FINETUNE_FULL, data_spec, overrides)
    if len(s.crop_scale) != 2 or not 0 < s.crop_scale[0] <= s.crop_scale[1] <= 1:
        raise ConfigError(f"--crop-scale needs two area fractions lo,hi with 0 < lo <= hi <= 1, got {s.crop_scale}")
    torch.manual_seed(s.seed)
    splits = labelled_splits(pretrained.config, data_spec, train_spec, background, s.max_train, s.max_eval, s.seed)
    train = splits.train
    visual = pretrained.model.visual
    model = (
        cnn_classifier(visual, splits.num_classes, s.drop_path)
        if isinstance(visual, CNNTower)
        else classifier_from(visual, splits.num_classes, s.drop_path, s.pool)
    )
    train_skips, skips = Skips(), Skips()
    curve = fit_classifier(model, train, s, pretrained.image_size, device, num_workers, train_skips)
    model.eval()
    logits, labels = extract(model, splits.test, pretrained.image_size, device, 256, num_workers, skips)
    skips.merge(train_skips.as_dict())
    metrics = {**topk_accuracy(logits, labels), "chance": 1.0 / splits.num_classes}
    dataset = {
        "spec": data_spec,
        "train": splits.train_spec,
        "num_train": len(train) - len(train_skips),
        "num_images": len(labels),
        "num_classes": splits.num_classes,
        "skipped": skips.as_dict(),
    }
    return make_result("finetune", pretrained, dataset, s, metrics, started, background, curve={"train_loss": curve})
