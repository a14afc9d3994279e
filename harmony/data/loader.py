"""Training batches for one epoch, sharded by rank and worker, deterministic from the seed.

Global batch k of an epoch is fixed by (seed, epoch): map-style data takes positions
[k*GB, (k+1)*GB) of a seeded permutation and rank r the r-th slice of it; shard streams split by
(rank, worker). Every sample's augmentation seed is a function of (seed, epoch, sample id), so
K ranks x B see exactly the images 1 rank x K*B sees. `start_step` resumes mid-epoch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from harmony.config import Config
from harmony.data.sources import BuiltinSource, DataError, ShardSource, decode_sample, open_source
from harmony.data.views import ViewMaker, collate
from harmony.train.distributed import DistInfo


def sample_seed(seed: int, epoch: int, sample_id: int | str) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (index, sample seed) for this rank's share of every global batch of one epoch."""

    def __init__(self, size: int, global_batch: int, dist: DistInfo, seed: int) -> None:
        self.size, self.global_batch, self.dist, self.seed = size, global_batch, dist, seed
        self.local_batch = global_batch // dist.world_size
        self.steps = size // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0) * self.local_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, "permutation"))
        perm = torch.randperm(self.size, generator=gen).tolist()
        for step in range(self.start_step, self.steps):
            base = step * self.global_batch + self.dist.rank * self.local_batch
            for index in perm[base : base + self.local_batch]:
                yield index, sample_seed(self.seed, self.epoch, index)


class MapViews(Dataset[dict[str, Any]]):
    """Map-style source + views; an unreadable sample is replaced by the next one and counted."""

    def __init__(self, source: BuiltinSource, maker: ViewMaker, max_tries: int = 16) -> None:
        self.source, self.maker, self.max_tries = source, maker, max_tries

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        errors = 0
        for _ in range(self.max_tries):
            try:
                raw = self.source.load(index)
                out = self.maker(raw.image, raw.caption, seed)
                out["index"] = torch.tensor(index)
                out["data_errors"] = torch.tensor(errors)
                return out
            except (OSError, ValueError):
                errors += 1
                index = (index + 1) % len(self.source)
        raise DataError(f"{self.max_tries} consecutive samples could not be read (last index {index})")


class ShardBatches(IterableDataset[dict[str, torch.Tensor]]):
    """Each worker yields whole batches; DataLoader interleaves workers round-robin, so batch k of the
    epoch comes from worker k % num_workers, which lets a resumed run skip exactly what was consumed."""

    def __init__(
        self, source: ShardSource, maker: ViewMaker, cfg: Config, dist: DistInfo, epoch: int, start_step: int
    ) -> None:
        self.source, self.maker, self.dist, self.epoch, self.start_step = source, maker, dist, epoch, start_step
        self.batch = cfg.train.batch_size // dist.world_size
        self.seed, self.buffer = cfg.train.seed, max(cfg.data.shuffle_buffer, 1)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        part, parts = self.dist.rank * workers + worker, self.dist.world_size * workers
        rng = random.Random(f"{self.seed}/{self.epoch}/shuffle/{part}")
        stream = self.source.raw_samples(self.seed, self.epoch, part, parts)
        buffer: list[dict[str, object]] = []
        batch_no, errors = worker, 0
        samples: list[dict[str, Any]] = []
        for raw in stream:
            if len(buffer) < self.buffer:
                buffer.append(raw)
                continue
            slot = rng.randrange(len(buffer))
            raw, buffer[slot] = buffer[slot], raw
            if batch_no < self.start_step:
                samples.append({})
            else:
                try:
                    sample = decode_sample(raw)
                    view = self.maker(sample.image, sample.caption, sample_seed(self.seed, self.epoch, sample.key))
                except (OSError, ValueError, SyntaxError):
                    errors += 1
                    continue
                view["index"] = torch.tensor(-1)
                samples.append(view)
            if len(samples) == self.batch:
                if batch_no >= self.start_step:
                    out = collate(samples)
                    out["data_errors"] = torch.tensor([errors])
                    errors = 0
                    yield out
                samples = []
                batch_no += workers


@dataclass
class TrainData:
    """Epoch-wise batches for this rank."""

    cfg: Config
    dist: DistInfo
    source: BuiltinSource | ShardSource
    maker: ViewMaker
    steps_per_epoch: int
    _loader: DataLoader[Any] | None = None
    _sampler: EpochSampler | None = None

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        if isinstance(self.source, ShardSource):
            dataset = ShardBatches(self.source, self.maker, self.cfg, self.dist, epoch, start_step)
            loader: DataLoader[Any] = DataLoader(
                dataset, batch_size=None, num_workers=self.cfg.data.num_workers, pin_memory=self._pin()
            )
            for i, batch in enumerate(loader):
                if i >= self.steps_per_epoch - start_step:
                    break
                yield batch
            return
        if self._loader is None:
            self._sampler = EpochSampler(len(self.source), self.cfg.train.batch_size, self.dist, self.cfg.train.seed)
            workers = self.cfg.data.num_workers
            self._loader = DataLoader(
                MapViews(self.source, self.maker),
                batch_size=self.cfg.train.batch_size // self.dist.world_size,
                sampler=self._sampler,
                num_workers=workers,
                collate_fn=collate,
                pin_memory=self._pin(),
                drop_last=True,
                persistent_workers=workers > 0,
            )
        assert self._sampler is not None
        self._sampler.set_epoch(epoch, start_step)
        yield from self._loader

    def _pin(self) -> bool:
        return self.cfg.data.pin_memory and torch.cuda.is_available()


def build_train_data(cfg: Config, maker: ViewMaker, dist: DistInfo) -> TrainData:
    if cfg.train.batch_size % dist.world_size:
        raise DataError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {dist.world_size} processes")
    source = open_source(cfg.data_spec, cfg)
    size = len(source) if isinstance(source, BuiltinSource) else source.epoch_size
    steps = size // cfg.train.batch_size
    if steps == 0:
        raise DataError(
            f"the dataset has {size} samples, fewer than one global batch of {cfg.train.batch_size}: lower --batch-size"
        )
    return TrainData(cfg, dist, source, maker, steps)
