"""Weighted mixing of several sources: `data_spec` parts joined by `::` become separate sources when
`data.weights` gives one weight each, and every sample of an epoch comes from source i with probability w_i.

- The source of the sample at global position p of an epoch (global batch p // GB, place p % GB) is drawn from
  a generator seeded by (train.seed, epoch): a function of the position alone, so any number of ranks and
  workers, and a resumed run, draw the same source for the same position.
- An epoch is `data.epoch_size` samples, by default the sources' sizes summed (weights in proportion to the
  sizes then give every sample once per epoch on average); as without mixing, whole global batches only.
- Each source is read as a source alone is (`shard_plan`), dealt by a `SourceDeal`: its k-th draw of the epoch
  goes to the part (rank x worker) making that position's batch, and pass j over it serves draws
  [j*N, (j+1)*N) of its N samples. A source drawn more often than it holds samples is read again from the
  start within the epoch (a new pass, reshuffled); such samples count as re-read.
- Map-style sources (CSV, builtin:shapes) give their k-th draw the row at place k % N of pass k // N's seeded
  permutation: the same sample at each position for any number of ranks and workers. Shard sources keep
  their own reading (contiguous ranges, shuffle buffer): the same samples per pass.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import torch

from harmony.config import Config
from harmony.data.csv_source import CsvSource
from harmony.data.decode import RawSample
from harmony.data.errors import SampleError
from harmony.data.shard_plan import Layout
from harmony.data.sources import BuiltinSource, PassEnd, ShardItem, ShardSource, open_source

PATTERN_CHARACTERS = frozenset("{}*?[]")


def derived_seed(*parts: object) -> int:
    """A non-negative 63-bit seed from `parts` (numpy's generators take no negative seeds)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def source_names(specs: Sequence[str]) -> list[str]:
    """Short names for the metrics: a spec's last folder or file stem without patterns (`general/{0000..0999}.tar`
    -> general, `domain/*.tar` -> domain, `pairs.csv` -> pairs, `builtin:shapes:val` -> shapes_val), `source<i>`
    when none is left; a name several sources share gets each one's index."""
    names = []
    for i, spec in enumerate(specs):
        if spec.startswith("builtin:"):
            base = spec.removeprefix("builtin:").replace(":", "_")
        else:
            plain = [p for p in re.split(r"[/\\]", spec) if p and not PATTERN_CHARACTERS & set(p)]
            base = PurePosixPath(plain[-1]).stem if plain else ""
        names.append(re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_.") or f"source{i}")
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def draw_sources(weights: Sequence[float], seed: int, epoch: int, count: int) -> np.ndarray:
    """The source of each of an epoch's first `count` positions: i with probability weights[i] / sum(weights)."""
    edges = np.cumsum(weights) / sum(weights)
    unit = np.random.default_rng(derived_seed(seed, epoch, "mix")).random(count)
    return np.minimum(np.searchsorted(edges, unit, side="right"), len(weights) - 1).astype(np.int16)


class EpochMix:
    """One epoch's draws over `layout`: `sources[p]` for every trained position p, and per source the part
    that takes each of its draws in order (`owners`)."""

    def __init__(self, weights: Sequence[float], seed: int, epoch: int, layout: Layout) -> None:
        self.layout = layout
        global_batch = layout.ranks * layout.local_batch
        count = layout.steps * global_batch
        self.sources = draw_sources(weights, seed, epoch, count)
        positions = np.arange(count)
        rank = positions % global_batch // layout.local_batch
        parts = rank * layout.workers + positions // global_batch % layout.workers  # `Layout.slot`, vectorised
        self.owners = [parts[self.sources == i].astype(np.int32) for i in range(len(weights))]

    def batch_sources(self, step: int, rank: int) -> list[int]:
        """The sources of rank `rank`'s share of global batch `step`, place by place."""
        start = (step * self.layout.ranks + rank) * self.layout.local_batch
        return [int(s) for s in self.sources[start : start + self.layout.local_batch]]


@dataclass(frozen=True)
class SourceDeal:
    """One source's passes dealt to the loader's parts (a `shard_plan.Deal`): draw k of the epoch goes to
    `owners[k]`, pass j over the source's `pass_size` samples serves draws [j*pass_size, (j+1)*pass_size), and
    what a pass holds beyond the epoch's draws is dealt to the parts in turn (spares, for unusable samples). A
    source of unknown size (remote shards) deals every pass as its first."""

    owners: np.ndarray
    parts: int
    pass_size: int | None

    def _first(self, pass_no: int) -> int:
        return pass_no * self.pass_size if self.pass_size else 0

    def slots(self, pass_no: int, size: int) -> np.ndarray:
        """The part of each of the first `size` places of pass `pass_no`."""
        draw = np.arange(self._first(pass_no), self._first(pass_no) + size)
        parts = (draw - len(self.owners)) % self.parts
        drawn = draw < len(self.owners)
        parts[drawn] = self.owners[draw[drawn]]
        return parts

    def slot(self, position: int, pass_no: int) -> int:
        draw = self._first(pass_no) + position
        return int(self.owners[draw]) if draw < len(self.owners) else (draw - len(self.owners)) % self.parts

    def shares(self, pass_no: int) -> list[int]:
        """Each part's draws served by the pass; a pass past the epoch's draws (only read to replace unusable
        samples) is shared like all of them."""
        first = self._first(pass_no)
        served = self.owners[first : first + self.pass_size] if self.pass_size else self.owners
        counts = np.bincount(served if len(served) else self.owners, minlength=self.parts)
        return [int(c) for c in counts] if counts.any() else [1] * self.parts


def map_samples(
    source: BuiltinSource | CsvSource, spec: str, seed: int, epoch: int, deal: SourceDeal, part: int
) -> Iterator[RawSample | SampleError | PassEnd]:
    """Part `part`'s draws from a map-style source, endless: pass j is a permutation of the rows seeded by
    (seed, epoch, j), of which the part takes the places `deal` gives it (an unusable row as its SampleError);
    a PassEnd after each pass."""
    size = len(source)
    for pass_no in itertools.count():
        order = np.random.default_rng(derived_seed(seed, epoch, pass_no)).permutation(size)
        for row in order[deal.slots(pass_no, size) == part].tolist():
            try:
                yield source.load(row)
            except SampleError as exc:
                yield exc
        yield PassEnd((spec,))


class Mixture:
    """The opened sources of a mix with their names, normalised weights and sizes (None: remote shards), the
    epoch's size, and what the run says and logs about them."""

    def __init__(self, cfg: Config) -> None:
        self.specs = cfg.data_spec.split("::")
        self.weights = [w / sum(cfg.data.weights) for w in cfg.data.weights]
        self.names = source_names(self.specs)
        self.sources = [open_source(spec, cfg) for spec in self.specs]
        self.sizes = [
            (sum(s.counts) if s.counts is not None else None) if isinstance(s, ShardSource) else len(s)
            for s in self.sources
        ]
        self.epoch_size = cfg.data.epoch_size or sum(size or 0 for size in self.sizes)  # remote: ShardSource asks
        self._said: set[int] = set()

    def is_stream(self, index: int) -> bool:
        return isinstance(self.sources[index], ShardSource)

    def urls(self, index: int) -> list[str]:
        """What a pass over source `index` reads (for `guard.ReadGuard`)."""
        source = self.sources[index]
        return source.urls if isinstance(source, ShardSource) else [self.specs[index]]

    def items(self, index: int, seed: int, epoch: int, mix: EpochMix, part: int) -> Iterator[ShardItem | RawSample]:
        """Part `part`'s endless stream of source `index` in `epoch` (each source with a seed of its own)."""
        source, own_seed = self.sources[index], derived_seed(seed, "source", index)
        deal = SourceDeal(mix.owners[index], mix.layout.parts, self.sizes[index])
        if isinstance(source, ShardSource):
            return source.raw_samples(own_seed, epoch, deal, part)
        return map_samples(source, self.specs[index], own_seed, epoch, deal, part)

    def no_counts(self) -> torch.Tensor:
        """The counts a batch carries as `data_sources`, all zero: [drawn, re-read] x sources."""
        return torch.zeros(2, len(self.sources), dtype=torch.long)

    def record(self, counts: torch.Tensor) -> dict[str, float]:
        """The metrics of `counts` ([2, sources], summed over ranks): samples drawn from each source and how many
        of them were read again because the source ran out within the epoch."""
        drawn, reread = counts.tolist()
        return {f"data/source_{n}": d for n, d in zip(self.names, drawn)} | {
            f"data/reread_{n}": r for n, r in zip(self.names, reread)
        }

    def ran_out(self, counts: torch.Tensor) -> list[str]:
        """One line for each source that `counts` shows re-read and that was not said before (said once)."""
        lines = []
        for i, reread in enumerate(counts[1].tolist()):
            if reread and i not in self._said:
                self._said.add(i)
                held = f"{self.sizes[i]} samples" if self.sizes[i] is not None else "samples of unknown number"
                lines.append(
                    f"data: source '{self.names[i]}' ({held}) ran out within an epoch and is read again from the "
                    f"start: the mix draws about {round(self.weights[i] * self.epoch_size)} of an epoch's "
                    f"{self.epoch_size} from it; the repeats are counted as data/reread_{self.names[i]}"
                )
        return lines

    def describe(self, counts: torch.Tensor) -> str:
        """'mix: general 602 (30.1%), domain 1398 (69.9%, 898 re-read)' for the end of the run."""
        drawn, reread = counts.tolist()
        total = max(sum(drawn), 1)
        parts = [
            f"{n} {d} ({100 * d / total:.1f}%" + (f", {r} re-read)" if r else ")")
            for n, d, r in zip(self.names, drawn, reread)
        ]
        return "mix: " + ", ".join(parts)
