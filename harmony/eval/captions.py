"""Captioned image sets for retrieval, each image with one or more captions.

Specs:
- `builtin:shapes[:val]`: every image with `per_image` captions drawn afresh from its own scene
  (so none is a mismatched web caption);
- a `.csv`/`.tsv` table with `filepath` and `caption` columns (rows of one image are grouped);
- a `.json` in COCO captions format (`images` + `annotations` with `caption`) or the Karpathy
  split format (`images` with `filename`, `split`, `sentences`), which the Flickr30K and COCO
  retrieval benchmarks use; `split` picks the Karpathy split.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from harmony.config import Config
from harmony.data.shapes import caption_for
from harmony.data.sources import DataError
from harmony.eval.datasets import shapes_dataset


@dataclass
class CaptionedImages:
    name: str
    size: int
    get: Callable[[int], tuple[Image.Image, list[str]]]

    def __len__(self) -> int:
        return self.size


def _from_files(name: str, items: list[tuple[Path, list[str]]]) -> CaptionedImages:
    if not items:
        raise DataError(f"'{name}' holds no captioned images")

    def get(i: int) -> tuple[Image.Image, list[str]]:
        path, captions = items[i]
        with Image.open(path) as image:
            return image.convert("RGB"), captions

    return CaptionedImages(name, len(items), get)


def _builtin(spec: str, cfg: Config, per_image: int) -> CaptionedImages:
    ds = shapes_dataset(spec, cfg)

    def get(i: int) -> tuple[Image.Image, list[str]]:
        scene = ds.scene(i)
        order = sorted(range(len(scene.objects)), key=lambda j: -scene.objects[j].radius)
        captions = [
            caption_for(scene, order, ds.image_size, random.Random(f"retrieval/{ds.seed}/{ds.split}/{i}/{j}"))
            for j in range(per_image)
        ]
        return ds[i].image, captions

    return CaptionedImages(spec, len(ds), get)


def _table(path: Path, image_key: str, caption_key: str) -> CaptionedImages:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    if rows and (image_key not in rows[0] or caption_key not in rows[0]):
        raise DataError(f"'{path}' needs '{image_key}' and '{caption_key}' columns, has {list(rows[0])}")
    grouped: dict[str, list[str]] = {}
    for row in rows:
        grouped.setdefault(row[image_key], []).append(row[caption_key])
    return _from_files(str(path), [(path.parent / p, c) for p, c in grouped.items()])


def _json(path: Path, image_root: Path | None, split: str) -> CaptionedImages:
    data = json.loads(path.read_text())
    images = data.get("images", [])
    if images and "sentences" in images[0]:  # Karpathy split format
        root = image_root or path.parent
        items = [
            (root / im.get("filepath", "") / im["filename"], [s["raw"] for s in im["sentences"]])
            for im in images
            if im.get("split", split) == split
        ]
        return _from_files(f"{path}#{split}", items)
    if "annotations" not in data:
        raise DataError(f"'{path}' is neither COCO captions nor Karpathy-split json")
    guess = path.parent.parent / path.stem.split("_")[-1]
    root = image_root or (guess if guess.is_dir() else path.parent)
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    items = [(root / im["file_name"], captions[im["id"]]) for im in images if im["id"] in captions]
    return _from_files(str(path), items)


def open_captioned(
    spec: str, cfg: Config, per_image: int = 5, image_root: Path | None = None, split: str = "test"
) -> CaptionedImages:
    """A captioned image set from a spec (see the module docstring)."""
    if spec.startswith("builtin:"):
        return _builtin(spec, cfg, per_image)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"'{spec}' is not a captioned dataset (builtin:shapes[:val], a .csv/.tsv or a .json)")
    if path.suffix.lower() in (".csv", ".tsv"):
        return _table(path, cfg.data.csv_image_key, cfg.data.csv_caption_key)
    if path.suffix.lower() == ".json":
        return _json(path, image_root, split)
    raise DataError(f"'{spec}': captioned sets are .csv, .tsv or .json files")
