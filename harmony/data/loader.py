"""Training batches for one epoch, sharded by rank and worker, deterministic from the seed.

Global batch k of an epoch is fixed by (seed, epoch): map-style data takes positions
[k*GB, (k+1)*GB) of a seeded permutation and rank r the r-th slice of it; shard streams split by
(rank, worker). Every sample's augmentation seed is a function of (seed, epoch, sample id), so
K ranks x B see exactly the images 1 rank x K*B sees. `start_step` resumes mid-epoch.

Unusable samples are skipped, never fatal: every batch carries `data_errors`, the samples skipped
since that worker's previous batch, per reason (`SKIP_REASONS`; `.sum()` is the total), and
`TrainData.skipped` keeps the running totals of this rank.

With `data.device_augment` the workers ship image bytes + crop plans and `TrainData` renders the crops on
`device` (see `device_augment`); batches then arrive with their tensors on that device.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from harmony.config import Config, check_batch_per_process
from harmony.core.distributed import DistInfo
from harmony.data.csv_source import CsvSource
from harmony.data.decode import RawSample
from harmony.data.device_augment import DeviceAugment, PlanMaker, device_augment_enabled, prefetched
from harmony.data.errors import SKIP_REASONS, DataError, SampleError
from harmony.data.guard import ReadGuard, SkipTally, worker_message
from harmony.data.sources import BuiltinSource, Layout, PassEnd, ShardSource, decode_sample, open_source
from harmony.data.views import ViewMaker, collate_for

MapSource = BuiltinSource | CsvSource


def sample_seed(seed: int, epoch: int, sample_id: int | str) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def epoch_permutation(size: int, seed: int, epoch: int) -> list[int]:
    """The order of map-style data in one epoch (global batch k takes positions [k*GB, (k+1)*GB))."""
    gen = torch.Generator().manual_seed(sample_seed(seed, epoch, "permutation"))
    return torch.randperm(size, generator=gen).tolist()


@dataclass(frozen=True)
class Slot:
    """One sample of an epoch's map-style order: its row, augmentation seed, and place in the epoch."""

    index: int
    seed: int
    epoch: int
    position: int


class EpochSampler(Sampler[Slot]):
    """Yields the `Slot`s of this rank's share of every global batch of one epoch."""

    def __init__(self, size: int, global_batch: int, dist: DistInfo, seed: int) -> None:
        self.size, self.global_batch, self.dist, self.seed = size, global_batch, dist, seed
        self.local_batch = global_batch // dist.world_size
        self.steps = size // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0) * self.local_batch

    def __iter__(self) -> Iterator[Slot]:
        perm = epoch_permutation(self.size, self.seed, self.epoch)
        for step in range(self.start_step, self.steps):
            base = step * self.global_batch + self.dist.rank * self.local_batch
            for position in range(base, base + self.local_batch):
                index = perm[position]
                yield Slot(index, sample_seed(self.seed, self.epoch, index), self.epoch, position)


class MapViews(Dataset[dict[str, Any]]):
    """Map-style source + views. An unusable sample is counted (once) and replaced by a sample from outside its
    global batch, so a batch never holds one sample twice (a contrast would take it for its own negative): the
    sample the epoch leaves out at the same place in the last partial batch, else the sample at the same place of
    the following global batches, in turn. Slots of one batch so draw from disjoint samples, alike on every rank
    and worker."""

    def __init__(self, source: MapSource, maker: ViewMaker | PlanMaker, global_batch: int, seed: int) -> None:
        self.source, self.maker, self.global_batch, self.seed = source, maker, global_batch, seed
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def _permutation(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_permutation(len(self.source), self.seed, epoch))
        return self._order[1]

    def replacements(self, slot: Slot) -> Iterator[int]:
        """Rows that may stand in for `slot`'s, in order (class doc)."""
        perm, batch = self._permutation(slot.epoch), self.global_batch
        whole = len(perm) // batch * batch
        place, start = slot.position % batch, slot.position - slot.position % batch
        if whole + place < len(perm):
            yield perm[whole + place]
        for later in range(1, whole // batch):
            yield perm[(start + later * batch) % whole + place]

    def __getitem__(self, slot: Slot) -> dict[str, Any]:
        tally, index, first = SkipTally(), slot.index, None
        candidates, tried = self.replacements(slot), 0
        while True:
            try:
                raw = self.source.load(index)
                out = self.maker(raw.image, raw.caption, slot.seed)
            except SampleError as exc:
                if first is None:  # the slot's own sample is counted; a stand-in that fails is counted where it
                    first = exc  # is a batch's own sample
                    tally.add(exc)
                index, tried = next(candidates, -1), tried + (first is not exc)
                if index < 0:
                    raise DataError(self._unreplaceable(first, exc, tried)) from None
                continue
            out["index"] = torch.tensor(index)
            out["data_errors"] = tally.take()
            return out

    def _unreplaceable(self, first: SampleError, last: SampleError, tried: int) -> str:
        if tried:
            return (
                f"{first}; the {tried} samples that could replace it without repeating one of its global batch are "
                f"unusable too (the last: {last}): fix or remove the unusable rows, or lower --batch-size"
            )
        return (
            f"{first}; every other sample is in its global batch of {self.global_batch}, so a replacement would "
            "repeat one (a contrast would take it for its own negative): fix or remove the unusable rows, or lower "
            "--batch-size"
        )


def shuffled(buffer: list[RawSample], sample: RawSample, size: int, rng: random.Random) -> RawSample | None:
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


class ShardBatches(IterableDataset[dict[str, torch.Tensor]]):
    """Each worker yields whole batches; DataLoader interleaves workers round-robin, so batch k of the
    epoch comes from worker k % num_workers, which lets a resumed run skip what was consumed (without
    decoding pixels: exact unless a skipped sample failed only at pixel decode)."""

    def __init__(
        self,
        source: ShardSource,
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

    def _header(self, item: dict[str, object] | SampleError) -> RawSample | SampleError:
        """Caption and image header checks: cheap, done before the shuffle buffer."""
        if isinstance(item, SampleError):
            return item
        try:
            return decode_sample(item, self.max_pixels)
        except SampleError as exc:
            return exc

    def _view(self, raw: RawSample) -> dict[str, Any] | SampleError:
        try:
            view = self.maker(raw.image, raw.caption, sample_seed(self.seed, self.epoch, raw.key))
        except SampleError as exc:
            return exc
        view["index"] = torch.tensor(-1)
        return view

    def _raws(
        self, layout: Layout, part: int, rng: random.Random, tally: SkipTally, guard: ReadGuard
    ) -> Iterator[RawSample]:
        """Header-checked samples of this part, shuffled through the buffer, which is flushed at the end of
        every pass (so an epoch of whole passes sees every sample once)."""
        buffer: list[RawSample] = []
        for item in self.source.raw_samples(self.seed, self.epoch, layout, part):
            if isinstance(item, PassEnd):
                rng.shuffle(buffer)
                yield from buffer
                buffer.clear()
                guard.end_pass(item.shards)
                continue
            raw = self._header(item)
            if isinstance(raw, SampleError):
                tally.add(raw)
                guard.failed(raw)
                continue
            ready = shuffled(buffer, raw, self.buffer, rng)
            if ready is not None:
                yield ready

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers = self.workers
        # DataLoader takes batches round-robin from worker 0; a run resumed at `start_step` needs batch
        # start_step + i from the i-th worker, so worker ids rotate by start_step.
        worker = ((info.id if info is not None else 0) + self.start_step) % workers
        layout = Layout(self.dist.world_size, workers, self.batch, self.steps)
        part = self.dist.rank * workers + worker
        if layout.batches(part) == 0:
            return
        rng = random.Random(f"{self.seed}/{self.epoch}/shuffle/{part}")
        tally, guard = SkipTally(), ReadGuard(self.source.spec, self.source.urls, part, layout.parts)
        samples: list[dict[str, Any]] = []
        batch_no = worker
        for raw in self._raws(layout, part, rng, tally, guard):
            view = {} if batch_no < self.start_step else self._view(raw)
            if isinstance(view, SampleError):
                tally.add(view)
                guard.failed(view)
                continue
            guard.ok()
            samples.append(view)
            if len(samples) == self.batch:
                errors = tally.take()
                if batch_no >= self.start_step:
                    yield {**self.collate(samples), "data_errors": errors}
                samples = []
                batch_no += workers
                if batch_no >= self.steps:
                    return


@dataclass
class TrainData:
    """Epoch-wise batches for this rank; `skipped` counts this rank's skipped samples per reason."""

    cfg: Config
    dist: DistInfo
    source: MapSource | ShardSource
    maker: ViewMaker | PlanMaker
    steps_per_epoch: int
    render: DeviceAugment | None = None
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    _loader: DataLoader[Any] | None = None
    _sampler: EpochSampler | None = None

    def left_out(self) -> str:
        """'' or a line saying how many samples each epoch leaves out (the last partial global batch)."""
        size = self.source.epoch_size if isinstance(self.source, ShardSource) else len(self.source)
        batch = self.cfg.train.batch_size
        extra = size - self.steps_per_epoch * batch
        if extra <= 0:
            return ""
        return (
            f"data: each epoch trains {self.steps_per_epoch * batch} of the {size} samples ({self.steps_per_epoch} "
            f"global batches of {batch}); the other {extra} only stand in for unusable ones"
        )

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of `epoch` from `start_step`; a worker's DataError arrives as one line."""
        batches = self._batches(epoch, start_step)
        if self.render is not None:
            batches = prefetched(batches, self.render)
        try:
            for batch in batches:
                counts = batch["data_errors"].reshape(-1, len(SKIP_REASONS)).sum(0).tolist()
                for reason, count in zip(SKIP_REASONS, counts):
                    self.skipped[reason] += int(count)
                yield batch
        except DataError as exc:
            raise DataError(worker_message(exc)) from None

    def _batches(self, epoch: int, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
        if isinstance(self.source, ShardSource):
            dataset = ShardBatches(
                self.source, self.maker, self.cfg, self.dist, epoch, start_step, self.steps_per_epoch
            )
            loader: DataLoader[Any] = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.cfg.data.num_workers,
                pin_memory=self._pin(),
                generator=self._generator(),
            )
            batches = iter(loader)
            try:
                for i, batch in enumerate(batches):
                    if i >= self.steps_per_epoch - start_step:
                        break
                    yield batch
            finally:
                stop_workers(batches)
            return
        if self._loader is None:
            self._sampler = EpochSampler(len(self.source), self.cfg.train.batch_size, self.dist, self.cfg.train.seed)
            workers = self.cfg.data.num_workers
            self._loader = DataLoader(
                MapViews(self.source, self.maker, self.cfg.train.batch_size, self.cfg.train.seed),
                batch_size=self.cfg.train.batch_size // self.dist.world_size,
                sampler=self._sampler,
                num_workers=workers,
                collate_fn=collate_for(self.cfg),
                pin_memory=self._pin(),
                drop_last=True,
                persistent_workers=workers > 0,
                generator=self._generator(),
            )
        assert self._sampler is not None
        self._sampler.set_epoch(epoch, start_step)
        yield from self._loader

    def _generator(self) -> torch.Generator:
        """The loader's own generator for its workers' base seed: drawn from the global RNG instead, each
        new epoch iterator would shift the model's random stream (drop-path), and a resumed run with it."""
        return torch.Generator().manual_seed(self.cfg.train.seed)

    def _pin(self) -> bool:
        return self.cfg.data.pin_memory and torch.cuda.is_available()


def stop_workers(batches: Iterator[Any]) -> None:
    """Stop a DataLoader iterator's worker processes now. Left to the garbage collector (the iterator sits in
    reference cycles, more so after a worker's error), they are stopped after the queues they listen on are
    gone, and each waits out torch's 5 s timeout: an epoch that ends early or a run that stops on a data error
    would pause that long."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean-up, as its __del__ calls it
    if shutdown is not None:
        shutdown()


def build_train_data(cfg: Config, maker: ViewMaker, dist: DistInfo, device: torch.device | None = None) -> TrainData:
    """This rank's training data; crops are rendered on `device` when `data.device_augment` is on for it."""
    if cfg.train.batch_size % dist.world_size:
        raise DataError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {dist.world_size} processes")
    check_batch_per_process(cfg, dist.world_size)
    source = open_source(cfg.data_spec, cfg)
    size = source.epoch_size if isinstance(source, ShardSource) else len(source)
    steps = size // cfg.train.batch_size
    if steps == 0:
        raise DataError(
            f"the dataset has {size} samples, fewer than one global batch of {cfg.train.batch_size}: lower --batch-size"
        )
    if device is not None and device_augment_enabled(cfg.data.device_augment, device):
        return TrainData(cfg, dist, source, PlanMaker(maker), steps, DeviceAugment(maker, device))
    return TrainData(cfg, dist, source, maker, steps)
