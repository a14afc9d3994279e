"""Where (image, caption) pairs come from, chosen by the `--data` spec.

- `builtin:shapes` / `builtin:shapes:val`: the generated dataset (map-style).
- a path ending in `.csv` / `.tsv`: image paths and captions in columns (map-style, see `csv_source`).
- a directory of `.tar` shards, a brace pattern (`shards/{00000..00331}.tar`), globs, `::`-joined
  lists, or anything webdataset opens (`pipe:aws s3 cp ... -`, URLs): WebDataset shards in the
  img2dataset layout (`key.jpg|jpeg|png|webp` + `key.txt`, optional `key.json`), iterable.

With `data.weights`, the `::`-separated parts of a spec are separate sources instead, each sample drawn from
one of them by weight (`harmony.data.mixing`).

Every source hands out `RawSample`s whose image is opened lazily (header only), so the view maker
decodes it once at the scale its crops need. Unusable samples raise `SampleError` (skipped, counted).
"""

from __future__ import annotations

import glob
import itertools
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import braceexpand
from PIL import Image

from harmony.config import Config
from harmony.data.csv_source import CsvSource
from harmony.data.decode import DEFAULT_MAX_PIXELS, RawSample, open_image
from harmony.data.errors import DataError, SampleError
from harmony.data.shapes import ShapesDataset
from harmony.data.shard_plan import Deal, Layout, Segment, contiguous_segments
from harmony.data.shard_reader import (
    IMAGE_EXTENSIONS,
    Sample,
    caption_of,
    count_samples,
    header_problem,
    image_extension,
    is_remote,
    named_sample,
    read_shard,
)

OPEN_SHARDS = 8  # shards a loader part reads at once, drawing each sample from a random one of them
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # PIL refuses beyond twice this even where open_image is not used
__all__ = [
    "IMAGE_EXTENSIONS",
    "BuiltinSource",
    "DataError",
    "Layout",
    "PassEnd",
    "RawSample",
    "SampleError",
    "ShardSource",
    "caption_of",
    "open_source",
    "read_shard",
]


@dataclass(frozen=True)
class PassEnd:
    """Marks the end of one pass over a part's shards; `shards` are the URLs it read."""

    shards: tuple[str, ...]


ShardItem = Sample | SampleError | PassEnd
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


def decode_sample(sample: Sample, max_pixels: int = DEFAULT_MAX_PIXELS) -> RawSample:
    """A shard sample -> RawSample with a lazily opened image; raises SampleError (see `header_problem`)."""
    problem = header_problem(sample)
    if problem is not None:
        raise problem
    data = sample[str(image_extension(sample))]
    if not isinstance(data, bytes):
        raise SampleError("image", f"sample {sample.get('__key__', '?')}: its image was not read")
    return RawSample(str(sample.get("__key__", "?")), open_image(data, max_pixels), caption_of(sample))


class ShardSource:
    """Iterable WebDataset shards. Every pass is dealt to the loader's parts (rank x worker) by
    `harmony.data.shard_plan`: exactly by usable samples for local shards (their counts are read at start),
    by whole shards for remote ones (counts unknown); with `resample`, shards are drawn with replacement
    instead (an endless stream without pass boundaries)."""

    def __init__(self, spec: str, epoch_size: int = 0, resample: bool = False) -> None:
        self.spec, self.resample = spec, resample
        self.urls = expand_urls(spec)
        remote = any(is_remote(u) for u in self.urls)
        self.counts: list[int] | None = None if remote else [count_samples(u) for u in self.urls]
        if not epoch_size and self.counts is None:
            raise DataError(
                f"data spec '{self.spec}' is remote: set data.epoch_size to the number of samples per epoch"
            )
        if self.counts is not None and sum(self.counts) == 0:
            raise DataError(f"data spec '{self.spec}' holds no usable samples: {first_problem(self.urls)}")
        self.epoch_size = epoch_size or sum(self.counts or [])

    def pass_order(self, seed: int, epoch: int, pass_no: int) -> list[int]:
        """The shards' order (indices into `urls`) in one pass."""
        order = list(range(len(self.urls)))
        random.Random(f"{seed}/{epoch}/{pass_no}").shuffle(order)
        return order

    def resampled(self, seed: int, epoch: int, pass_no: int, part: int, parts: int) -> list[str]:
        """With `resample`: the shards part `part` of `parts` draws (with replacement) for one pass."""
        rng = random.Random(f"{seed}/{epoch}/{pass_no}/resample/{part}")
        return [rng.choice(self.urls) for _ in range(-(-len(self.urls) // parts))]

    def raw_samples(self, seed: int, epoch: int, layout: Deal, part: int) -> Iterator[ShardItem]:
        """Endless stream for part `part` of `layout` (a `Layout`, or one source's share of a mix): sample dicts, a
        SampleError per unusable sample or unreadable shard, and a PassEnd after each pass (shard order reshuffled
        every pass). A part reads up to OPEN_SHARDS of its shards at once and draws every sample from a random one
        of them, so shards that each hold one class still give mixed batches."""
        for pass_no in itertools.count():
            mix = mixing_rng(seed, epoch, pass_no)
            if self.resample:
                yield from strided_samples(self.resampled(seed, epoch, pass_no, part, layout.parts), Layout(), 0, mix)
                continue
            order = self.pass_order(seed, epoch, pass_no)
            urls = [self.urls[i] for i in order]
            if len(urls) < layout.parts:
                yield from strided_samples(urls, layout, part, mix, pass_no)
            elif self.counts is None:
                yield from strided_samples(urls[part :: layout.parts], Layout(), 0, mix)
            else:
                counts = [self.counts[i] for i in order]
                segments = contiguous_segments(urls, counts, layout, part, pass_no)
                own = mixing_rng(seed, epoch, pass_no, part)
                yield from interleave((segment_samples(s) for s in segments), OPEN_SHARDS, own)
                yield PassEnd(tuple(s.url for s in segments))


def first_problem(urls: list[str]) -> str:
    """What the first shard that holds samples but no usable one holds, for the 'no usable samples' error."""
    for url in urls:
        for item in read_shard(url):
            problem = item if isinstance(item, SampleError) else header_problem(item)
            if problem is not None:
                return str(problem)
    return "every shard is empty"


def segment_samples(segment: Segment) -> Iterator[Sample | SampleError]:
    """A part's share of one shard (`shard_plan.Segment`): its samples [lo, hi) among the shard's
    `named_sample`s (those of them that prove unusable as SampleError), the others met among them, and what
    follows the last one only for the part that owns the shard's end; that part also says when the shard holds
    fewer samples than counted (an outdated `_stats.json`)."""
    index = 0  # named samples of the shard before the current item
    for item in read_shard(segment.url):
        if isinstance(item, SampleError):
            if segment.owns_end:
                yield item
            return
        if index >= segment.hi and not segment.owns_end:
            return
        if segment.lo <= index < segment.hi or (index >= segment.hi and segment.owns_end):
            yield header_problem(item) or item
        index += named_sample(item)
    if segment.owns_end and index < segment.hi:
        yield SampleError(
            "shard",
            f"shard '{segment.url}' holds {index} samples with an image and a caption, fewer than the {segment.hi} "
            "counted for it (is its _stats.json outdated?): delete the stats file so that the shard is counted",
        )


def mixing_rng(seed: int, epoch: int, pass_no: int, part: int | None = None) -> random.Random:
    """The draws that interleave the open shards of one pass: shared by every part when they all read the same
    shards, `part`'s own when it reads a share of its own."""
    return random.Random(f"{seed}/{epoch}/{pass_no}/interleave" + (f"/{part}" if part is not None else ""))


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


def strided_samples(
    urls: list[str], deal: Deal, part: int, rng: random.Random, pass_no: int = 0
) -> Iterator[ShardItem]:
    """Pass `pass_no` over `urls` read by every part alike (OPEN_SHARDS at once, interleaved by `rng`), keeping the
    samples whose place among the pass's `named_sample`s `deal` deals to `part` (any other goes with the next
    one of those; a shard's read error to part `shard number % parts`); then a PassEnd."""
    shards = (numbered(number, read_shard(url)) for number, url in enumerate(urls))
    position = 0
    for number, item in interleave(shards, OPEN_SHARDS, rng):
        if isinstance(item, SampleError):
            if number % deal.parts == part:
                yield item
            continue
        if deal.slot(position, pass_no) == part:
            yield header_problem(item) or item
        position += named_sample(item)
    yield PassEnd(tuple(urls))


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
