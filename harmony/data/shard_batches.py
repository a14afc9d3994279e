"""A part's batches of one epoch from shard streams (and, under mixing, several sources): the iterable half of
`harmony.data.loader`, which documents the order and seeds.

Batch k of an epoch is made by worker k % W of every rank (`shard_plan`); each place of a batch takes the next
usable sample of its source's stream (one stream without mixing), an unusable one counted and replaced by the
next. A resumed run skips the batches before its step without decoding their pixels.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils.data import IterableDataset, get_worker_info

from harmony.config import Config
from harmony.core.distributed import DistInfo
from harmony.data.decode import RawSample
from harmony.data.device_augment import PlanMaker
from harmony.data.errors import SampleError
from harmony.data.guard import ReadGuard, SkipTally
from harmony.data.mixing import EpochMix, Mixture
from harmony.data.sources import Layout, PassEnd, ShardItem, ShardSource, decode_sample
from harmony.data.views import ViewMaker, collate_for

T = TypeVar("T")


def sample_seed(seed: int, epoch: int, sample_id: int | str) -> int:
    """A sample's augmentation seed: a function of (seed, epoch, sample id) alone, whoever loads it."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def shuffled(buffer: list[T], sample: T, size: int, rng: random.Random) -> T | None:
    """Shuffle-buffer step: fill up to `size`, then swap the new sample for a random buffered one (size 0:
    no buffer, samples stay in stream order)."""
    if size == 0:
        return sample
    if len(buffer) < size:
        buffer.append(sample)
        return None
    slot = rng.randrange(len(buffer))
    out, buffer[slot] = buffer[slot], sample
    return out


@dataclass
class Stream:
    """One source's header-checked samples for this part, each with the pass over the source it comes from,
    and the guard that stops a stream in which nothing is readable."""

    samples: Iterator[tuple[int, RawSample]]
    guard: ReadGuard


class ShardBatches(IterableDataset[dict[str, torch.Tensor]]):
    """Each worker yields whole batches; DataLoader interleaves workers round-robin, so batch k of the
    epoch comes from worker k % num_workers, which lets a resumed run skip what was consumed (without
    decoding pixels: exact unless a skipped sample failed only at pixel decode). With a `Mixture`, every place
    of a batch takes the next sample of the source the epoch's draw gives it (`harmony.data.mixing`), and every
    batch carries `data_sources`: [drawn, re-read] x sources."""

    def __init__(
        self,
        source: ShardSource | Mixture,
        maker: ViewMaker | PlanMaker,
        cfg: Config,
        dist: DistInfo,
        epoch: int,
        start_step: int,
        steps: int,
    ) -> None:
        self.source, self.maker, self.dist, self.epoch, self.start_step = source, maker, dist, epoch, start_step
        self.batch, self.steps = cfg.train.batch_size // dist.world_size, steps
        self.workers = max(cfg.data.num_workers, 1)
        self.seed, self.buffer = cfg.train.seed, max(cfg.data.shuffle_buffer, 0)
        self.max_pixels = cfg.data.max_image_pixels
        self.collate = collate_for(cfg)
        self.layout = Layout(dist.world_size, self.workers, self.batch, steps)
        self.mix = EpochMix(source.weights, self.seed, epoch, self.layout) if isinstance(source, Mixture) else None

    def _header(self, item: dict[str, object] | RawSample | SampleError) -> RawSample | SampleError:
        """Caption and image header checks: cheap, done before the shuffle buffer."""
        if isinstance(item, (RawSample, SampleError)):
            return item
        try:
            return decode_sample(item, self.max_pixels)
        except SampleError as exc:
            return exc

    def _view(self, raw: RawSample, sample_id: str) -> dict[str, Any] | SampleError:
        try:
            view = self.maker(raw.image, raw.caption, sample_seed(self.seed, self.epoch, sample_id))
        except SampleError as exc:
            return exc
        view["index"] = torch.tensor(-1)
        return view

    def _raws(
        self,
        items: Iterator[ShardItem | RawSample],
        buffer_size: int,
        rng: random.Random,
        tally: SkipTally,
        guard: ReadGuard,
    ) -> Iterator[tuple[int, RawSample]]:
        """Header-checked samples of one source with their pass number, shuffled through a buffer of `buffer_size`
        that is flushed at the end of every pass (so an epoch of whole passes sees every sample once)."""
        buffer: list[tuple[int, RawSample]] = []
        pass_no = 0
        for item in items:
            if isinstance(item, PassEnd):
                rng.shuffle(buffer)
                yield from buffer
                buffer.clear()
                guard.end_pass(item.shards)
                pass_no += 1
                continue
            raw = self._header(item)
            if isinstance(raw, SampleError):
                tally.add(raw)
                guard.failed(raw)
                continue
            ready = shuffled(buffer, (pass_no, raw), buffer_size, rng)
            if ready is not None:
                yield ready

    def _streams(self, part: int, tally: SkipTally) -> list[Stream]:
        """This part's stream of each source (one without mixing), each with its own shuffle buffer; a map-style
        source's rows come in a seeded order already."""
        source, seed, epoch = self.source, self.seed, self.epoch
        if isinstance(source, ShardSource):
            items = source.raw_samples(seed, epoch, self.layout, part)
            return [self._stream(items, source.spec, source.urls, part, self.buffer, f"{part}", tally)]
        assert self.mix is not None
        return [
            self._stream(
                source.items(i, seed, epoch, self.mix, part),
                spec,
                source.urls(i),
                part,
                self.buffer if source.is_stream(i) else 0,
                f"{part}/{i}",
                tally,
            )
            for i, spec in enumerate(source.specs)
        ]

    def _stream(
        self,
        items: Iterator[ShardItem | RawSample],
        spec: str,
        urls: list[str],
        part: int,
        buffer: int,
        shuffle: str,
        tally: SkipTally,
    ) -> Stream:
        guard = ReadGuard(spec, urls, part, self.layout.parts)
        rng = random.Random(f"{self.seed}/{self.epoch}/shuffle/{shuffle}")
        return Stream(self._raws(items, buffer, rng, tally, guard), guard)

    def _draw(self, stream: Stream, source: int, tally: SkipTally, skip: bool) -> tuple[dict[str, Any], int]:
        """The next usable sample of `stream` ({} in a batch a resumed run skips: no pixels decoded) and its pass;
        the unusable ones before it are counted."""
        while True:
            pass_no, raw = next(stream.samples)
            sample_id = raw.key if self.mix is None else f"{source}/{pass_no}/{raw.key}"
            view = {} if skip else self._view(raw, sample_id)
            if isinstance(view, SampleError):
                tally.add(view)
                stream.guard.failed(view)
                continue
            stream.guard.ok()
            return view, pass_no

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers = self.workers
        # DataLoader takes batches round-robin from worker 0; a run resumed at `start_step` needs batch
        # start_step + i from the i-th worker, so worker ids rotate by start_step.
        worker = ((info.id if info is not None else 0) + self.start_step) % workers
        part = self.dist.rank * workers + worker
        if self.layout.batches(part) == 0:
            return
        tally = SkipTally()
        streams = self._streams(part, tally)
        for batch_no in range(worker, self.steps, workers):
            skip = batch_no < self.start_step
            places = self.mix.batch_sources(batch_no, self.dist.rank) if self.mix else [0] * self.batch
            drawn = torch.zeros(2, len(streams), dtype=torch.long)
            samples = []
            for source in places:
                view, pass_no = self._draw(streams[source], source, tally, skip)
                samples.append(view)
                drawn[:, source] += torch.tensor([1, pass_no > 0])
            errors = tally.take()
            if skip:
                continue
            batch = {**self.collate(samples), "data_errors": errors}
            yield batch if self.mix is None else {**batch, "data_sources": drawn}
