"""Where (image, caption) pairs come from, chosen by the `--data` spec.

- `builtin:shapes` / `builtin:shapes:val`: the generated dataset (map-style).
- a path ending in `.csv` / `.tsv`: image paths and captions in columns (map-style, see `csv_source`).
- a directory of `.tar` shards, a brace pattern (`shards/{00000..00331}.tar`), globs, `::`-joined
  lists, or anything webdataset opens (`pipe:aws s3 cp ... -`, URLs): WebDataset shards in the
  img2dataset layout (`key.jpg|jpeg|png|webp` + `key.txt`, optional `key.json`), iterable.

Every source hands out `RawSample`s whose image is opened lazily (header only), so the view maker
decodes it once at the scale its crops need. Unusable samples raise `SampleError` (skipped, counted).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import braceexpand
import webdataset as wds
from PIL import Image

from harmony.config import Config
from harmony.data.csv_source import CsvSource
from harmony.data.decode import DEFAULT_MAX_PIXELS, RawSample, open_image
from harmony.data.errors import DataError, SampleError
from harmony.data.shapes import ShapesDataset

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://")
OPEN_SHARDS = 8  # shards a loader part reads at once, drawing each sample from a random one of them
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # PIL refuses beyond twice this even where open_image is not used
__all__ = ["BuiltinSource", "DataError", "PassEnd", "RawSample", "SampleError", "ShardSource", "open_source"]


@dataclass(frozen=True)
class PassEnd:
    """Marks the end of one pass over a part's shards; `shards` are the URLs it read."""

    shards: tuple[str, ...]


ShardItem = dict[str, object] | SampleError | PassEnd
T = TypeVar("T")


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


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES) or "://" in url


def expand_urls(spec: str) -> list[str]:
    """Shard URLs of a spec: a directory (its *.tar, sorted), brace patterns, globs, `::`-joined lists."""
    urls: list[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                images = any(p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS for p in Path(part).rglob("*"))
                hint = (
                    f": it holds images; make shards with harmony data from-folder {part} --out SHARDS"
                    if images
                    else ""
                )
                raise DataError(f"directory '{part}' holds no .tar shards{hint}")
            urls.extend(found)
            continue
        for url in braceexpand.braceexpand(part):
            if not is_remote(url) and any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    missing = [u for u in urls if not is_remote(u) and not os.path.exists(u)]
    if not urls or len(missing) == len(urls):
        raise DataError(f"data spec '{spec}' matches no files")
    if missing:
        raise DataError(f"data spec '{spec}': {len(missing)} shard(s) missing, first: {missing[0]}")
    return urls


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def caption_of(sample: dict[str, object]) -> str:
    """`key.txt`, else the `caption` field of `key.json` (img2dataset writes both); stripped."""
    if "txt" in sample:
        return _text(sample["txt"]).strip()
    if "json" in sample:
        try:
            meta = json.loads(_text(sample["json"]))
        except ValueError:
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return str(meta["caption"]).strip()
    raise SampleError("caption", f"sample {sample.get('__key__', '?')} has no caption")


def decode_sample(sample: dict[str, object], max_pixels: int = DEFAULT_MAX_PIXELS) -> RawSample:
    """A webdataset sample dict -> RawSample with a lazily opened image; raises SampleError."""
    key = str(sample.get("__key__", "?"))
    caption = caption_of(sample)
    if not caption:
        raise SampleError("caption", f"sample {key} has an empty caption")
    data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if not isinstance(data, bytes):
        raise SampleError("image", f"sample {key} has no image")
    return RawSample(key, open_image(data, max_pixels), caption)


def read_shard(url: str) -> Iterator[dict[str, object] | SampleError]:
    """The samples of one shard, then one SampleError if the shard could not be read to its end."""
    failures: list[Exception] = []

    def record(exc: Exception) -> bool:
        failures.append(exc)
        return True

    yield from wds.tariterators.tarfile_samples([{"url": url}], handler=record)
    if failures:
        yield SampleError("shard", f"shard '{url}' is unreadable or truncated: {describe(failures[0])}")


def describe(exc: Exception) -> str:
    """A short reason from an exception webdataset decorated with extra args (url, stream)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc.args[0]) if exc.args else type(exc).__name__


class ShardSource:
    """Iterable WebDataset shards; each (rank, worker) part reads a disjoint share of every pass, or
    with `resample` draws shards with replacement (an endless stream, no pass boundaries to align)."""

    def __init__(self, spec: str, epoch_size: int = 0, resample: bool = False) -> None:
        self.spec, self.resample = spec, resample
        self.urls = expand_urls(spec)
        self.epoch_size = epoch_size or self._count()

    def _count(self) -> int:
        """Captioned samples in local shards: from img2dataset's `{shard}_stats.json` when present, else
        counted from tar headers. Remote specs need data.epoch_size."""
        if any(is_remote(u) for u in self.urls):
            raise DataError(
                f"data spec '{self.spec}' is remote: set data.epoch_size to the number of samples per epoch"
            )
        total = sum(count_shard(url) for url in self.urls)
        if total == 0:
            raise DataError(f"data spec '{self.spec}' holds no captioned samples")
        return total

    def pass_shards(self, seed: int, epoch: int, pass_no: int, part: int, parts: int) -> tuple[list[str], bool]:
        """This part's shards for one pass, and whether every part reads them all and splits by sample
        (when there are fewer shards than parts)."""
        if self.resample:
            rng = random.Random(f"{seed}/{epoch}/{pass_no}/resample/{part}")
            return [rng.choice(self.urls) for _ in range(-(-len(self.urls) // parts))], False
        order = list(self.urls)
        random.Random(f"{seed}/{epoch}/{pass_no}").shuffle(order)
        if len(order) >= parts:
            return order[part::parts], False
        return order, True

    def raw_samples(self, seed: int, epoch: int, part: int, parts: int) -> Iterator[ShardItem]:
        """Endless stream for part `part` of `parts` (rank x worker): sample dicts, a SampleError per
        unreadable shard, and a PassEnd after each pass (shard order reshuffled every pass). Each pass
        reads OPEN_SHARDS shards at once and draws every sample from a random one of them (the same draws
        for every part), so shards that each hold one class still give mixed batches."""
        for pass_no in itertools.count():
            urls, by_sample = self.pass_shards(seed, epoch, pass_no, part, parts)
            mix = mixing_rng(seed, epoch, pass_no)
            if by_sample:
                yield from pass_samples(urls, part, parts, mix, OPEN_SHARDS)
            else:
                yield from pass_samples(urls, 0, 1, mix, OPEN_SHARDS)


def mixing_rng(seed: int, epoch: int, pass_no: int) -> random.Random:
    """The draws that interleave the open shards of one pass."""
    return random.Random(f"{seed}/{epoch}/{pass_no}/interleave")


def interleave(streams: Iterable[Iterator[T]], width: int, rng: random.Random) -> Iterator[T]:
    """Every item of `streams`, reading `width` of them at a time: each next item comes from a random open
    stream, and a finished stream is replaced by the next one (webdataset's shard interleaving). Width 1
    reads the streams one after the other."""
    waiting, active = iter(streams), list[Iterator[T]]()
    while True:
        while len(active) < width and (stream := next(waiting, None)) is not None:
            active.append(stream)
        if not active:
            return
        at = rng.randrange(len(active)) if len(active) > 1 else 0
        for item in active[at]:  # one item, or none when the stream is done
            yield item
            break
        else:
            active.pop(at)


def numbered(number: int, items: Iterator[T]) -> Iterator[tuple[int, T]]:
    """`items` tagged with their shard's number."""
    for item in items:
        yield number, item


def pass_samples(
    urls: list[str], part: int, parts: int, rng: random.Random | None = None, width: int = 1
) -> Iterator[ShardItem]:
    """One pass over `urls`, keeping every `parts`-th sample from `part` (and that share of shard errors);
    `width` shards are read at once (see `interleave`), 1: in the order of `urls`."""
    shards = (numbered(number, read_shard(url)) for number, url in enumerate(urls))
    index = 0
    for number, item in interleave(shards, width, rng or random.Random(0)):
        if isinstance(item, SampleError):
            if number % parts == part:
                yield item
            continue
        if index % parts == part:
            yield item
        index += 1
    yield PassEnd(tuple(urls))


def count_shard(url: str) -> int:
    """Captions in one local shard; an unreadable shard counts what could be read (the stream skips the rest)."""
    stats = Path(url).with_name(Path(url).stem + "_stats.json")
    if stats.is_file():
        try:
            successes = json.loads(stats.read_text()).get("successes")
            if isinstance(successes, int):
                return successes
        except (OSError, ValueError):
            pass
    total = 0
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                total += member.name.endswith(".txt")
    except (tarfile.TarError, OSError):
        pass
    return total


def open_source(spec: str, cfg: Config) -> BuiltinSource | ShardSource | CsvSource:
    if spec.startswith("builtin:"):
        parts = spec.split(":")
        if parts[1] != "shapes" or len(parts) > 3:
            raise DataError(f"unknown built-in dataset '{spec}': use builtin:shapes or builtin:shapes:val")
        split = parts[2] if len(parts) == 3 else "train"
        if split not in ("train", "val"):
            raise DataError(f"builtin:shapes has splits 'train' and 'val', not '{split}'")
        return BuiltinSource(split, cfg)
    if spec.lower().endswith((".csv", ".tsv")):
        return CsvSource(Path(spec), cfg.data)
    return ShardSource(spec, cfg.data.epoch_size, cfg.data.resample_shards)
