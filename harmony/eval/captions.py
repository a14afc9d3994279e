"""Captioned image sets for retrieval, each image with one or more captions.

Specs:
- `builtin:shapes[:val]`: every image with `per_image` captions drawn afresh from its own scene
  (so none is a mismatched web caption);
- a `.csv`/`.tsv` table with an image-path and a caption column (`image_key` / `caption_key`, the same
  meaning as `data.csv_image_key` / `data.csv_caption_key`; rows of one image are grouped);
- a `.json` in COCO captions format (`images` + `annotations` with `caption`) or the Karpathy
  split format (`images` with `filename`, `split`, `sentences`), which the Flickr30K and COCO
  retrieval benchmarks use; `split` picks the Karpathy split;
- anything else is read as local WebDataset shards, as for training (a folder of .tar, a brace
  pattern, globs): one caption per image; the compressed images are held in memory.
Unreadable images (and rows without a caption) are skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from harmony.config import Config
from harmony.core.colors import WHITE
from harmony.data.csv_source import read_columns, separator_for
from harmony.data.decode import open_image
from harmony.data.errors import DataError, SampleError
from harmony.data.rgb import to_rgb
from harmony.data.shapes import caption_for
from harmony.data.shard_reader import caption_of, header_problem, image_extension, is_remote, read_shard
from harmony.data.sources import expand_urls
from harmony.eval.datasets import shapes_dataset
from harmony.eval.images import Colour, Skips, background_name, read_image


@dataclass
class CaptionedImages:
    name: str
    size: int
    get: Callable[[int], tuple[Image.Image, list[str]]]
    skipped: dict[str, Any] = field(default_factory=dict)  # rows left out while opening the set

    def __len__(self) -> int:
        return self.size


@dataclass(frozen=True)
class TableColumns:
    """Where a .csv/.tsv keeps image paths and captions, and how its fields are separated."""

    image_key: str = "filepath"
    caption_key: str = "caption"
    separator: str = "auto"


def _from_files(
    name: str, items: list[tuple[Path, list[str]]], background: Colour, max_pixels: int, skips: Skips | None = None
) -> CaptionedImages:
    if not items:
        why = f" ({len(skips)} rows skipped; first: {skips.examples[0]})" if skips else ""
        raise DataError(f"'{name}' holds no captioned images{why}")

    def get(i: int) -> tuple[Image.Image, list[str]]:
        path, captions = items[i]
        return read_image(path, background, max_pixels), captions

    shown = name if background == WHITE else f"{name} on {background_name(background)}"
    return CaptionedImages(shown, len(items), get, (skips or Skips()).as_dict())


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


def _table(path: Path, columns: TableColumns, background: Colour, max_pixels: int) -> CaptionedImages:
    """Rows of a CSV/TSV (read by the training reader), grouped by image; blank fields are skipped rows."""
    keys = (columns.image_key, columns.caption_key)
    try:
        rows = list(read_columns(path, keys, separator_for(path, columns.separator)))
    except DataError as exc:
        raise DataError(f"{exc} (harmony eval: --image-key / --caption-key / --separator)") from None
    grouped: dict[str, list[str]] = {}
    skips = Skips()
    for number, (image, caption) in enumerate(rows, start=1):
        if not image.strip() or not caption.strip():
            missing = "caption" if image.strip() else "image"
            skips.add(SampleError(missing, f"{path} row {number} has no {missing}"))
            continue
        if is_remote(image.strip()):
            skips.add(SampleError("image", f"{path} row {number}: '{image.strip()}' is a URL (not downloaded)"))
            continue
        grouped.setdefault(image.strip(), []).append(caption.strip())
    items = [(path.parent / p, c) for p, c in grouped.items()]
    return _from_files(str(path), items, background, max_pixels, skips)


def _shards(spec: str, background: Colour, max_pixels: int) -> CaptionedImages:
    """Every (image, caption) of local WebDataset shards, images kept compressed in memory."""
    urls = expand_urls(spec)
    if any(is_remote(u) for u in urls):
        raise DataError(f"'{spec}' is remote: retrieval reads local shards, a .csv/.tsv or a .json")
    samples: list[tuple[str, bytes, str]] = []
    skips = Skips()
    for url in urls:
        for item in read_shard(url):
            if isinstance(item, SampleError):
                skips.add(item)
                continue
            problem = header_problem(item)
            if problem is not None:
                skips.add(problem)
                continue
            data = item[str(image_extension(item))]
            assert isinstance(data, bytes)  # read_shard reads every image member
            samples.append((f"{url}#{item['__key__']}", data, caption_of(item)))
    if not samples:
        raise DataError(f"'{spec}' holds no captioned images ({len(skips)} samples skipped)")

    def get(i: int) -> tuple[Image.Image, list[str]]:
        name, data, caption = samples[i]
        try:
            image = open_image(data, max_pixels)
            image.load()
            return to_rgb(image, background), [caption]
        except SampleError as exc:
            raise SampleError("image", f"{name}: {exc}") from None
        except Exception as exc:  # corrupt image data, in whatever type the codec raises
            raise SampleError("image", f"{name}: image data unreadable ({type(exc).__name__}: {exc})") from None

    shown = spec if background == WHITE else f"{spec} on {background_name(background)}"
    return CaptionedImages(shown, len(samples), get, skips.as_dict())


def _json(path: Path, image_root: Path | None, split: str, background: Colour, max_pixels: int) -> CaptionedImages:
    data = json.loads(path.read_text())
    images = data.get("images", [])
    if images and "sentences" in images[0]:  # Karpathy split format
        root = image_root or path.parent
        items = [
            (root / im.get("filepath", "") / im["filename"], [s["raw"] for s in im["sentences"]])
            for im in images
            if im.get("split", split) == split
        ]
        return _from_files(f"{path}#{split}", items, background, max_pixels)
    if "annotations" not in data:
        raise DataError(f"'{path}' is neither COCO captions nor Karpathy-split json")
    guess = path.parent.parent / path.stem.split("_")[-1]
    root = image_root or (guess if guess.is_dir() else path.parent)
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    items = [(root / im["file_name"], captions[im["id"]]) for im in images if im["id"] in captions]
    return _from_files(str(path), items, background, max_pixels)


def open_captioned(
    spec: str,
    cfg: Config,
    per_image: int = 5,
    image_root: Path | None = None,
    split: str = "test",
    columns: TableColumns = TableColumns(),
    background: Colour = WHITE,
) -> CaptionedImages:
    """A captioned image set from a spec (see the module docstring)."""
    if spec.startswith("builtin:"):
        return _builtin(spec, cfg, per_image)
    path, max_pixels = Path(spec), cfg.data.max_image_pixels
    if path.suffix.lower() in (".csv", ".tsv", ".json") and not path.is_file():
        raise DataError(f"'{spec}' is not a file")
    if path.suffix.lower() in (".csv", ".tsv"):
        return _table(path, columns, background, max_pixels)
    if path.suffix.lower() == ".json":
        return _json(path, image_root, split, background, max_pixels)
    if path.is_file() and path.suffix.lower() != ".tar":
        raise DataError(f"'{spec}': captioned sets are .csv, .tsv or .json files, or WebDataset shards")
    return _shards(spec, background, max_pixels)
