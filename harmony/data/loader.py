"""Training batches for one epoch, sharded by rank and worker, deterministic from the seed.

Global batch k of an epoch is fixed by (seed, epoch): map-style data takes positions
[k*GB, (k+1)*GB) of a seeded permutation and rank r the r-th slice of it; shard streams split by
(rank, worker). Every sample's augmentation seed is a function of (seed, epoch, sample id), so
K ranks x B see exactly the images 1 rank x K*B sees. `start_step` resumes mid-epoch.

Unusable samples are skipped, never fatal: every batch carries `data_errors`, the samples skipped
since that worker's previous batch, per reason (`SKIP_REASONS`; `.sum()` is the total), and
`TrainData.skipped` keeps the running totals of this rank. Several sources mixed by weight (`data.weights`,
`harmony.data.mixing`) are read as shard streams are, and their batches carry `data_sources` (counted in
`TrainData.mixed`).

With `data.device_augment` the workers ship image bytes + crop plans and `TrainData` renders the crops on
`device` (see `device_augment`); batches then arrive with their tensors on that device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from harmony.config import Config, check_batch_per_process
from harmony.core.distributed import DistInfo
from harmony.data.csv_source import CsvSource
from harmony.data.device_augment import DeviceAugment, PlanMaker, device_augment_enabled, prefetched
from harmony.data.errors import SKIP_REASONS, DataError, SampleError
from harmony.data.guard import SkipTally, worker_message
from harmony.data.mixing import Mixture
from harmony.data.shard_batches import ShardBatches, sample_seed
from harmony.data.sources import BuiltinSource, ShardSource, open_source
from harmony.data.views import ViewMaker, collate_for

MapSource = BuiltinSource | CsvSource


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


def epoch_size(source: MapSource | ShardSource | Mixture) -> int:
    """Samples per epoch: a map-style source's rows, else the epoch size the source or the mix settled."""
    return len(source) if isinstance(source, (BuiltinSource, CsvSource)) else source.epoch_size


@dataclass
class TrainData:
    """Epoch-wise batches for this rank; `skipped` counts this rank's skipped samples per reason, `mixed` (with a
    `Mixture`) the samples drawn from each source and how many of them were re-read."""

    cfg: Config
    dist: DistInfo
    source: MapSource | ShardSource | Mixture
    maker: ViewMaker | PlanMaker
    steps_per_epoch: int
    render: DeviceAugment | None = None
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    mixed: torch.Tensor | None = None
    _loader: DataLoader[Any] | None = None
    _sampler: EpochSampler | None = None

    def __post_init__(self) -> None:
        if self.mixture is not None:
            self.mixed = self.mixture.no_counts()

    @property
    def mixture(self) -> Mixture | None:
        return self.source if isinstance(self.source, Mixture) else None

    def left_out(self) -> str:
        """'' or a line saying how many samples each epoch leaves out (the last partial global batch); a mix leaves
        none out, it draws as many as its whole batches take."""
        if self.mixture is not None:
            return ""
        size = epoch_size(self.source)
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
                if self.mixed is not None:
                    self.mixed += batch["data_sources"]
                yield batch
        except DataError as exc:
            raise DataError(worker_message(exc)) from None

    def _batches(self, epoch: int, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
        if isinstance(self.source, (ShardSource, Mixture)):
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
    source = Mixture(cfg) if len(cfg.data.weights) > 1 else open_source(cfg.data_spec, cfg)
    size = epoch_size(source)
    steps = size // cfg.train.batch_size
    if steps == 0:
        raise DataError(
            f"the dataset has {size} samples, fewer than one global batch of {cfg.train.batch_size}: lower --batch-size"
        )
    if device is not None and device_augment_enabled(cfg.data.device_augment, device):
        return TrainData(cfg, dist, source, PlanMaker(maker), steps, DeviceAugment(maker, device))
    return TrainData(cfg, dist, source, maker, steps)
