"""Object detection and instance segmentation: box AP and mask AP (COCO metrics via pycocotools).

torchvision's Mask R-CNN on the pre-trained ViT through a simple feature pyramid (see `pyramid.py`,
five levels with the extra max-pooled one for the RPN; anchors 8x each level's stride), trained end
to end: AdamW with layer-wise lr decay 0.75 on the ViT, weight decay 0.05, linear warm-up and x0.1
steps at 9/12 and 11/12 of training, horizontal flips and (for real data) multi-scale training.
The paper uses Cascade Mask R-CNN from mmdetection; plain Mask R-CNN is what torchvision provides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from harmony.core.colors import WHITE
from harmony.data.errors import DataError, SampleError
from harmony.eval import settings
from harmony.eval.datasets import default_train_spec
from harmony.eval.detdata import DetectionSet, DetViews, Target, coco_ground_truth, open_detection
from harmony.eval.images import Colour, SkippingLoader, Skips, either, require_some
from harmony.eval.metrics import coco_ap
from harmony.eval.optim import backbone_head_optimizer, warmup_schedule
from harmony.eval.pyramid import SimpleFeaturePyramid
from harmony.eval.report import make_result
from harmony.loading import Pretrained
from harmony.models.normalize import IMAGENET_MEAN, IMAGENET_STD
from harmony.models.vision import VisionTower


@dataclass(frozen=True)
class DetectSettings:
    epochs: int = field(default=6, metadata={"help": "training epochs"})
    batch_size: int = field(default=8, metadata={"help": "training batch (images)"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW peak lr (head; ViT layer-decayed)"})
    layer_decay: float = settings.layer_decay(0.75)
    weight_decay: float = settings.weight_decay()
    warmup_steps: int = field(default=20, metadata={"help": "linear lr warm-up steps"})
    decay_at: tuple[float, ...] = field(default=(0.75, 0.92), metadata={"help": "x0.1 lr at these fractions"})
    train_sizes: tuple[int, ...] = field(default=(0,), metadata={"help": "short sides drawn in training (0 = as is)"})
    test_size: int = field(default=0, metadata={"help": "short side at test (0 = as is)"})
    max_size: int = field(default=1333, metadata={"help": "cap on the long side"})
    fpn_channels: int = field(default=64, metadata={"help": "feature pyramid width"})
    box_head: int = field(default=256, metadata={"help": "box head MLP width"})
    mask_layers: int = field(default=2, metadata={"help": "3x3 convolutions in the mask head"})
    rois_per_image: int = field(default=64, metadata={"help": "sampled RoIs per image for the heads"})
    proposals: int = field(default=300, metadata={"help": "RPN proposals kept per image (train and test)"})
    detections_per_image: int = field(default=20, metadata={"help": "kept detections per test image"})
    max_train: int = settings.max_train(256)
    max_eval: int = settings.max_eval()
    seed: int = settings.seed()


DETECT_FULL = DetectSettings(
    epochs=12,
    batch_size=16,
    lr=1e-4,
    warmup_steps=500,
    train_sizes=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
    test_size=800,
    fpn_channels=256,
    box_head=1024,
    mask_layers=4,
    rois_per_image=512,
    proposals=1000,
    detections_per_image=100,
    max_train=0,
)


def build_mask_rcnn(visual: VisionTower, num_classes: int, s: DetectSettings, train_sizes: tuple[int, ...]) -> MaskRCNN:
    """Mask R-CNN (torchvision) on a trainable copy of the tower; `num_classes` excludes background."""
    backbone = SimpleFeaturePyramid(visual, s.fpn_channels, extra_level=True)
    c = s.fpn_channels
    anchors = AnchorGenerator(tuple((round(8 * st),) for st in backbone.strides), ((0.5, 1.0, 2.0),) * 5)
    model = MaskRCNN(
        backbone,
        min_size=train_sizes,
        max_size=s.max_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(c * 7 * 7, s.box_head),
        box_predictor=FastRCNNPredictor(s.box_head, num_classes + 1),
        box_batch_size_per_image=s.rois_per_image,
        box_detections_per_img=s.detections_per_image,
        rpn_pre_nms_top_n_train=s.proposals * 2,
        rpn_post_nms_top_n_train=s.proposals * 2,
        rpn_pre_nms_top_n_test=s.proposals,
        rpn_post_nms_top_n_test=s.proposals,
        mask_head=MaskRCNNHeads(c, (c,) * s.mask_layers, 1),
        mask_predictor=MaskRCNNPredictor(c, c, num_classes + 1),
    )
    return model


def _collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    return [b[0] for b in batch], [b[1] for b in batch]


def _inputs(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [im.to(device).float() / 255.0 for im in images]


def train_detector(
    model: MaskRCNN, train: DetectionSet, s: DetectSettings, device: torch.device, num_workers: int, skips: Skips
) -> list[float]:
    """Train in place; returns the mean total loss of each epoch. Unreadable images are left out (and
    counted in `skips` in the first epoch)."""
    views = DetViews(train, train=True)
    batch = min(s.batch_size, len(train))
    backbone = model.backbone
    assert isinstance(backbone, SimpleFeaturePyramid)
    heads = torch.nn.ModuleList([backbone.scales, backbone.fpn, model.rpn, model.roi_heads])
    optimizer = backbone_head_optimizer(backbone.vit, heads, s.lr, s.weight_decay, s.layer_decay)
    steps_per_epoch = len(train) // batch
    schedule = warmup_schedule(optimizer, s.epochs * steps_per_epoch, s.warmup_steps, decay_at=s.decay_at)
    model.to(device).train()
    curve, update = [], 0
    for epoch in range(s.epochs):
        views.epoch = epoch
        loader = SkippingLoader(
            views,
            skips if epoch == 0 else Skips(),
            _collate,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(s.seed + epoch),
        )
        total = 0.0
        for images, targets in loader:
            schedule.step_update(update)
            losses = model(_inputs(images, device), [{k: v.to(device) for k, v in t.items()} for t in targets])
            loss = torch.stack(list(losses.values())).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            update += 1
        curve.append(total / max(steps_per_epoch, 1))
    return curve


@torch.no_grad()
def detections_of(
    model: MaskRCNN, data: DetectionSet, test_size: int, device: torch.device, num_workers: int, skips: Skips
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(COCO ground truth, box results, mask results) over the readable images of an evaluation set."""
    from pycocotools import mask as mask_util

    model.eval()
    model.transform.min_size = (test_size,)
    boxes: list[dict[str, Any]] = []
    segms: list[dict[str, Any]] = []
    targets: list[Target] = []
    sizes: list[tuple[int, int]] = []
    loader = SkippingLoader(DetViews(data, train=False), skips, _collate, batch_size=8, num_workers=num_workers)
    for images, batch_targets in loader:
        for image, target, out in zip(images, batch_targets, model(_inputs(images, device))):
            image_id = len(sizes)
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            targets.append(target)
            for box, score, label, mask in zip(out["boxes"], out["scores"], out["labels"], out["masks"]):
                x0, y0, x1, y1 = box.tolist()
                common = {"image_id": image_id, "category_id": int(label), "score": float(score)}
                boxes.append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
                rle = mask_util.encode(np.asfortranarray((mask[0] > 0.5).cpu().numpy().astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                segms.append({**common, "segmentation": rle})
    require_some(len(sizes), skips, data.name)
    return coco_ground_truth(targets, sizes, data.class_names), boxes, segms


def _native_size(data: DetectionSet, spec: str) -> int:
    """The short side of the first readable image (the default training and test size)."""
    for i in range(len(data)):
        item = either(data.get, i)
        if not isinstance(item, SampleError):
            return min(item[0].size)
    raise DataError(f"no readable training image in '{spec}'")


def run_detect(
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    train_spec: str | None = None,
    image_root: Path | None = None,
    train_image_root: Path | None = None,
    num_workers: int = 2,
    background: Colour = WHITE,
    **overrides: Any,
) -> dict[str, Any]:
    """Box and mask AP / AP50 / AP75 on the evaluation set after training Mask R-CNN on the training set."""
    started = time.perf_counter()
    s = settings.resolve(DetectSettings(), DETECT_FULL, data_spec, overrides)
    torch.manual_seed(s.seed)
    train_spec = train_spec or default_train_spec(data_spec)
    opened = open_detection(train_spec, pretrained.config, train_image_root, background)
    train = opened.restricted(s.max_train, s.seed)
    test = open_detection(data_spec, pretrained.config, image_root, background).restricted(s.max_eval, s.seed)
    if train.class_names != test.class_names:
        raise DataError(f"'{train_spec}' and '{data_spec}' have different categories")
    native = _native_size(train, train_spec)
    train_sizes = tuple(size or native for size in s.train_sizes)
    model = build_mask_rcnn(pretrained.model.vit(), len(train.class_names), s, train_sizes)
    train_skips, test_skips, skips = Skips(), Skips(), Skips()
    curve = train_detector(model, train, s, device, num_workers, train_skips)
    truth, boxes, segms = detections_of(model, test, s.test_size or native, device, num_workers, test_skips)
    skips.merge(train_skips.as_dict())
    skips.merge(test_skips.as_dict())
    box, mask = coco_ap(truth, boxes, "bbox"), coco_ap(truth, segms, "segm")
    metrics = {**{f"box_{k}": v for k, v in box.items()}, **{f"mask_{k}": v for k, v in mask.items()}}
    dataset = {
        "spec": data_spec,
        "train": train_spec,
        "num_train": len(train) - len(train_skips),
        "num_images": len(test) - len(test_skips),
        "num_objects": len(truth["annotations"]),
        "num_classes": len(train.class_names),
        "skipped": skips.as_dict(),
    }
    return make_result("detect", pretrained, dataset, s, metrics, started, background, curve={"train_loss": curve})
