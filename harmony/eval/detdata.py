"""Detection / instance-segmentation sets: `builtin:shapes[:val]` boxes and masks, or COCO-format json.

A sample is a PIL image and a target in torchvision's detection format: `boxes` [n, 4] (x0, y0, x1,
y1, float), `labels` [n] (1-based, 0 is background), `masks` [n, H, W] (uint8). COCO specs are the
annotation file (e.g. `annotations/instances_val2017.json`); images are looked up in `image_root`,
else in `<json folder>/../<split name>` (COCO's layout: `val2017/`), else beside the json. Category
ids are mapped to 1..K in id order; crowd regions are left out.
`coco_ground_truth` turns any such set back into COCO format for pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from harmony.config import Config
from harmony.core.colors import WHITE
from harmony.data.errors import SampleError
from harmony.data.shapes import CLASS_NAMES
from harmony.data.sources import DataError
from harmony.eval.datasets import pick, shapes_dataset
from harmony.eval.images import Colour, either, read_image
from harmony.eval.transforms import to_uint8_tensor

Target = dict[str, torch.Tensor]


@dataclass
class DetectionSet:
    name: str
    class_names: list[str]
    size: int
    get: Callable[[int], tuple[Image.Image, Target]]

    def __len__(self) -> int:
        return self.size

    def restricted(self, limit: int, seed: int = 0) -> DetectionSet:
        index = pick(self.size, limit, seed)
        return DetectionSet(self.name, self.class_names, len(index), lambda i: self.get(index[i]))


def _target(boxes: list[list[float]], labels: list[int], masks: list[np.ndarray], height: int, width: int) -> Target:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.uint8),
    }


def _builtin(spec: str, cfg: Config) -> DetectionSet:
    ds = shapes_dataset(spec, cfg)

    def get(i: int) -> tuple[Image.Image, Target]:
        s = ds[i]
        keep = [j for j, box in enumerate(s.boxes) if box[2] > box[0] and box[3] > box[1]]
        masks = [(s.instances == j + 1).astype(np.uint8) for j in keep]
        h, w = s.instances.shape
        return s.image, _target([list(map(float, s.boxes[j])) for j in keep], [s.classes[j] for j in keep], masks, h, w)

    return DetectionSet(spec, list(CLASS_NAMES), len(ds), get)


def _coco(path: Path, image_root: Path | None, background: Colour, max_pixels: int) -> DetectionSet:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    boxes_only = sum(1 for a in coco.dataset.get("annotations", []) if not a.get("segmentation"))
    if boxes_only:
        raise DataError(
            f"'{path}': {boxes_only} annotation(s) without 'segmentation'; Mask R-CNN trains on instance masks "
            "(COCO polygons or RLE), box-only annotations are not supported"
        )
    cat_ids = sorted(coco.getCatIds())
    label_of = {c: i + 1 for i, c in enumerate(cat_ids)}
    names = [coco.cats[c]["name"] for c in cat_ids]
    guess = path.parent.parent / path.stem.split("_")[-1]
    root = image_root or (guess if guess.is_dir() else path.parent)
    image_ids = sorted(coco.getImgIds())

    def get(i: int) -> tuple[Image.Image, Target]:
        info = coco.imgs[image_ids[i]]
        rgb = read_image(root / info["file_name"], background, max_pixels)
        anns = [
            a for a in coco.imgToAnns[image_ids[i]] if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
        ]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        masks = [coco.annToMask(a) for a in anns]
        return rgb, _target(boxes, [label_of[a["category_id"]] for a in anns], masks, rgb.height, rgb.width)

    return DetectionSet(str(path), names, len(image_ids), get)


def open_detection(spec: str, cfg: Config, image_root: Path | None = None, background: Colour = WHITE) -> DetectionSet:
    """A detection set from a spec; an unreadable COCO image raises SampleError on `get`."""
    if spec.startswith("builtin:"):
        return _builtin(spec, cfg)
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".json":
        return _coco(path, image_root, background, cfg.data.max_image_pixels)
    raise DataError(f"'{spec}' is not a detection set (builtin:shapes[:val] or a COCO-format .json)")


def coco_ground_truth(targets: list[Target], sizes: list[tuple[int, int]], class_names: list[str]) -> dict[str, Any]:
    """COCO-format ground truth (image ids 0..n-1, RLE masks) for `metrics.coco_ap`."""
    from pycocotools import mask as mask_util

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (target, (h, w)) in enumerate(zip(targets, sizes)):
        images.append({"id": image_id, "height": h, "width": w})
        for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"]):
            rle = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": float(mask.sum()),
                    "segmentation": rle,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


class DetViews(Dataset[tuple[torch.Tensor, Target] | SampleError]):
    """(uint8 image [3, H, W], target); `train` flips half of the samples horizontally."""

    def __init__(self, data: DetectionSet, train: bool) -> None:
        self.data, self.train = data, train
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target] | SampleError:
        item = either(self.data.get, i)
        if isinstance(item, SampleError):
            return item
        image, target = item
        pixels = to_uint8_tensor(image)
        if self.train and random.Random(f"{self.epoch}/{i}").random() < 0.5:
            width = pixels.shape[-1]
            pixels = pixels.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}
        return pixels, target
