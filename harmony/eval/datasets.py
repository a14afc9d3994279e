"""Labelled image sets for evaluation: `builtin:shapes[:val]` or an image folder (one sub-folder per class)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from harmony.config import Config
from harmony.data.augment import eval_transform, normalize
from harmony.data.shapes import CLASS_NAMES, ShapesDataset
from harmony.data.sources import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class LabelledImages:
    name: str
    class_names: list[str]
    size: int
    get: Callable[[int], tuple[Image.Image, int]]

    def __len__(self) -> int:
        return self.size


def builtin_split(spec: str) -> str:
    parts = spec.split(":")
    if parts[:2] != ["builtin", "shapes"] or len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("train", "val")):
        raise DataError(f"unknown built-in dataset '{spec}': use builtin:shapes or builtin:shapes:val")
    return parts[2] if len(parts) == 3 else "train"


def shapes_dataset(spec: str, cfg: Config) -> ShapesDataset:
    b = cfg.data.builtin
    split = builtin_split(spec)
    return ShapesDataset(split, b.num_train if split == "train" else b.num_val, b.image_size, b.seed, b.mismatch_rate)


def image_folder(root: Path) -> LabelledImages:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder '{root}' has no class sub-folders")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(f"image folder '{root}' holds no images")

    def get(i: int) -> tuple[Image.Image, int]:
        path, label = files[i]
        with Image.open(path) as image:
            return image.convert("RGB"), label

    return LabelledImages(str(root), classes, len(files), get)


def open_labelled(spec: str, cfg: Config) -> LabelledImages:
    if spec.startswith("builtin:"):
        ds = shapes_dataset(spec, cfg)

        def get(i: int) -> tuple[Image.Image, int]:
            sample = ds[i]
            return sample.image, sample.label

        return LabelledImages(spec, list(CLASS_NAMES), len(ds), get)
    root = Path(spec)
    if root.is_dir():
        return image_folder(root)
    raise DataError(
        f"'{spec}' is not a labelled dataset (builtin:shapes[:val] or a folder with one sub-folder per class)"
    )


class _EvalViews(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, data: LabelledImages, image_size: int) -> None:
        self.data, self.image_size = data, image_size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.data.get(i)
        return eval_transform(image, self.image_size), label


@torch.no_grad()
def extract(
    encode: Callable[[torch.Tensor], torch.Tensor],
    data: LabelledImages,
    image_size: int,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, ...] from `encode(normalised images)`, labels [N]) over a labelled set."""
    loader = DataLoader(_EvalViews(data, image_size), batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for images, target in loader:
        feats.append(encode(normalize(images.to(device))).float().cpu())
        labels.append(target)
    return torch.cat(feats), torch.cat(labels)
