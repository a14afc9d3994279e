"""Semantic-segmentation sets: `builtin:shapes[:val]` masks or image/mask folders in the ADE20K layout.

Folder layout: `<root>/images/<split>/*.jpg` with `<root>/annotations/<split>/<same stem>.png`; the
spec names the image folder (e.g. `ADEChallengeData2016/images/validation`). With
`reduce_zero_label` (ADE20K's convention) mask value 0 is ignored and k becomes class k - 1. Ignored
pixels carry IGNORE. Views are square crops of `size`: random scale, crop and flip for training,
short-side resize and centre crop for evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from harmony.config import Config
from harmony.core.colors import WHITE
from harmony.data.decode import IMAGE_FILE_SUFFIXES, open_image
from harmony.data.errors import SampleError
from harmony.data.shapes import CLASS_NAMES
from harmony.data.sources import DataError
from harmony.eval.datasets import pick, shapes_dataset
from harmony.eval.images import Colour, either, read_image
from harmony.eval.transforms import to_uint8_tensor

IGNORE = 255


@dataclass
class MaskedImages:
    name: str
    class_names: list[str]
    size: int
    get: Callable[[int], tuple[Image.Image, np.ndarray]]

    def __len__(self) -> int:
        return self.size


def _builtin(spec: str, cfg: Config) -> MaskedImages:
    ds = shapes_dataset(spec, cfg)

    def get(i: int) -> tuple[Image.Image, np.ndarray]:
        sample = ds[i]
        return sample.image, sample.semantic

    return MaskedImages(spec, ["background", *CLASS_NAMES], len(ds), get)


def read_mask(path: Path, max_pixels: int) -> np.ndarray:
    """A label mask file as int64 class indices; SampleError when it cannot be read."""
    try:
        with open_image(path.read_bytes(), max_pixels) as mask:
            return np.asarray(mask, dtype=np.int64)
    except SampleError as exc:
        raise SampleError("image", f"mask '{path}': {exc}") from None
    except Exception as exc:  # missing file or corrupt data, in whatever type the codec raises
        raise SampleError("image", f"mask '{path}' unreadable ({type(exc).__name__}: {exc})") from None


def _folder(
    images: Path, reduce_zero_label: bool, class_names: list[str] | None, background: Colour, max_pixels: int
) -> MaskedImages:
    parts = list(images.parts)
    at = max((i for i, part in enumerate(parts) if part == "images"), default=None)
    masks = Path(*parts[:at], "annotations", *parts[at + 1 :]) if at is not None else images
    if masks == images or not masks.is_dir():
        raise DataError(f"no mask folder for '{images}': expected '<root>/annotations/<split>' beside it")
    pairs = [
        (path, masks / f"{path.stem}.png")
        for path in sorted(images.iterdir())
        if path.suffix.lower() in IMAGE_FILE_SUFFIXES and (masks / f"{path.stem}.png").exists()
    ]
    if not pairs:
        raise DataError(f"'{images}' has no image with a mask in '{masks}'")

    def get(i: int) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = pairs[i]
        rgb, label = read_image(image_path, background, max_pixels), read_mask(mask_path, max_pixels)
        if label.ndim != 2:
            raise SampleError(
                "image", f"mask '{mask_path}' has {label.ndim} dimensions: masks hold one class per pixel"
            )
        if reduce_zero_label:
            label = np.where(label == 0, IGNORE + 1, label) - 1
        return rgb, np.where(label >= IGNORE, IGNORE, label).astype(np.uint8)

    if class_names is None:
        samples = [either(get, i) for i in pick(len(pairs), 200)]
        found = [sample[1] for sample in samples if not isinstance(sample, SampleError)]
        if not found:
            raise DataError(f"no readable image/mask pair among the first ones in '{images}'")
        top = max(int(np.max(np.where(m == IGNORE, 0, m))) for m in found)
        class_names = [f"class{k}" for k in range(top + 1)]
    return MaskedImages(str(images), class_names, len(pairs), get)


def open_segmentation(
    spec: str,
    cfg: Config,
    reduce_zero_label: bool = True,
    class_names: list[str] | None = None,
    background: Colour = WHITE,
) -> MaskedImages:
    """A segmentation set from a spec; folder sets without `class_names` count classes from masks.
    An unreadable image or mask raises SampleError on `get`."""
    if spec.startswith("builtin:"):
        return _builtin(spec, cfg)
    if Path(spec).is_dir():
        return _folder(Path(spec), reduce_zero_label, class_names, background, cfg.data.max_image_pixels)
    raise DataError(f"'{spec}' is not a segmentation set (builtin:shapes[:val] or an ADE20K-style image folder)")


def _resize_pair(image: torch.Tensor, mask: torch.Tensor, short: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = TF.resize(image, [short], antialias=True)
    mask = TF.resize(mask.unsqueeze(0), list(image.shape[-2:]), interpolation=TF.InterpolationMode.NEAREST)[0]
    return image, mask


class SegViews(Dataset[tuple[torch.Tensor, torch.Tensor] | SampleError]):
    """(uint8 image [3, S, S], long mask [S, S]) views; `train` adds scale jitter, crop and flip."""

    def __init__(self, data: MaskedImages, size: int, train: bool, scale: tuple[float, float] = (0.5, 2.0)) -> None:
        self.data, self.size, self.train, self.scale = data, size, train, scale
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | SampleError:
        item = either(self.data.get, i)
        if isinstance(item, SampleError):
            return item
        image_pil, label = item
        image, mask = to_uint8_tensor(image_pil), torch.from_numpy(np.asarray(label, dtype=np.int64))
        if not self.train:
            image, mask = _resize_pair(image, mask, self.size)
            return TF.center_crop(image, [self.size]), TF.center_crop(mask.unsqueeze(0), [self.size])[0]
        rng = random.Random(f"{self.epoch}/{i}")
        image, mask = _resize_pair(image, mask, max(1, round(self.size * rng.uniform(*self.scale))))
        h, w = image.shape[-2:]
        pad_h, pad_w = max(0, self.size - h), max(0, self.size - w)
        if pad_h or pad_w:
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = TF.pad(mask.unsqueeze(0), [0, 0, pad_w, pad_h], fill=IGNORE)[0]
        h, w = image.shape[-2:]
        top, left = rng.randint(0, h - self.size), rng.randint(0, w - self.size)
        image = image[:, top : top + self.size, left : left + self.size]
        mask = mask[top : top + self.size, left : left + self.size]
        if rng.random() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask
