"""Where (image, caption) pairs come from, chosen by the `--data` spec.

- `builtin:shapes` / `builtin:shapes:val`: the generated dataset (map-style).
- a directory of `.tar` shards, a brace pattern (`shards/{00000..00331}.tar`), or anything webdataset
  opens (`pipe:aws s3 cp ... -`, URLs): WebDataset shards in the img2dataset layout (iterable).
"""

from __future__ import annotations

import glob
import io
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import braceexpand
import webdataset as wds
from PIL import Image

from harmony.config import Config
from harmony.data.shapes import ShapesDataset

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Image.MAX_IMAGE_PIXELS = 8192 * 8192


class DataError(ValueError):
    """A data problem the user can fix (bad spec, no files); the message says what and where."""


@dataclass
class RawSample:
    key: str
    image: Image.Image
    caption: str


class BuiltinSource:
    """Map-style access to `builtin:shapes`."""

    def __init__(self, split: str, cfg: Config) -> None:
        b = cfg.data.builtin
        num = b.num_train if split == "train" else b.num_val
        self.dataset = ShapesDataset(split, num, b.image_size, b.seed, b.mismatch_rate)

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> RawSample:
        sample = self.dataset[index]
        return RawSample(sample.key, sample.image, sample.caption)


def expand_urls(spec: str) -> list[str]:
    """Shard URLs of a spec: a directory (its *.tar, sorted), brace patterns, globs, `::`-joined lists."""
    urls: list[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise DataError(f"directory '{part}' holds no .tar shards")
            urls.extend(found)
            continue
        for url in braceexpand.braceexpand(part):
            if url.startswith(("pipe:", "http://", "https://", "gs://", "s3://")) or "://" in url:
                urls.append(url)
            elif any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    local_missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if not urls or len(local_missing) == len(urls):
        raise DataError(f"data spec '{spec}' matches no files")
    if local_missing:
        raise DataError(f"data spec '{spec}': {len(local_missing)} shard(s) missing, first: {local_missing[0]}")
    return urls


def decode_sample(sample: dict[str, object]) -> RawSample:
    """A webdataset sample dict -> RawSample; raises ValueError for anything unusable."""
    key = str(sample.get("__key__", "?"))
    data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if data is None:
        raise ValueError(f"sample {key} has no image")
    caption_bytes = sample.get("txt")
    if caption_bytes is None:
        raise ValueError(f"sample {key} has no caption")
    caption = (
        caption_bytes.decode("utf-8", "replace").strip() if isinstance(caption_bytes, bytes) else str(caption_bytes)
    )
    if not caption:
        raise ValueError(f"sample {key} has an empty caption")
    assert isinstance(data, bytes)
    image = Image.open(io.BytesIO(data))
    image.load()
    return RawSample(key, image.convert("RGB"), caption)


class ShardSource:
    """Iterable WebDataset shards; each (rank, worker) reads a disjoint part of an epoch's stream."""

    def __init__(self, spec: str, epoch_size: int = 0) -> None:
        self.spec = spec
        self.urls = expand_urls(spec)
        self.epoch_size = epoch_size or self._count()

    def _count(self) -> int:
        """Samples in local shards (captions counted from tar headers); remote specs need data.epoch_size."""
        import tarfile

        if any("://" in u or u.startswith("pipe:") for u in self.urls):
            raise DataError(
                f"data spec '{self.spec}' is remote: set data.epoch_size to the number of samples per epoch"
            )
        total = 0
        for url in self.urls:
            try:
                with tarfile.open(url) as tar:
                    total += sum(1 for m in tar if m.name.endswith(".txt"))
            except (tarfile.TarError, OSError) as exc:
                raise DataError(f"shard '{url}' cannot be read: {exc}") from None
        if total == 0:
            raise DataError(f"data spec '{self.spec}' holds no captioned samples")
        return total

    def raw_samples(self, seed: int, epoch: int, part: int, parts: int) -> Iterator[dict[str, object]]:
        """Endless stream of raw sample dicts for part `part` of `parts` (rank x worker), reshuffled
        shard order every pass. With fewer shards than parts, samples (not shards) are split."""
        pass_no = 0
        while True:
            order = list(self.urls)
            random.Random(f"{seed}/{epoch}/{pass_no}").shuffle(order)
            by_shard = len(order) >= parts
            mine = order[part::parts] if by_shard else order
            stream = wds.tariterators.tarfile_samples([{"url": u} for u in mine], handler=wds.warn_and_continue)
            for i, sample in enumerate(stream):
                if by_shard or i % parts == part:
                    yield sample
            pass_no += 1


def open_source(spec: str, cfg: Config) -> BuiltinSource | ShardSource:
    if spec.startswith("builtin:"):
        parts = spec.split(":")
        if parts[1] != "shapes" or len(parts) > 3:
            raise DataError(f"unknown built-in dataset '{spec}': use builtin:shapes or builtin:shapes:val")
        split = parts[2] if len(parts) == 3 else "train"
        if split not in ("train", "val"):
            raise DataError(f"builtin:shapes has splits 'train' and 'val', not '{split}'")
        return BuiltinSource(split, cfg)
    return ShardSource(spec, cfg.data.epoch_size)
