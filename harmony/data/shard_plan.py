"""How one pass over the shards is dealt to the loader's parts (rank x worker), so that an epoch trains every
usable sample once.

Batch k of an epoch is made by worker k % W of every rank (the DataLoader takes batches round-robin from its
workers), so part (r, w) makes `len(range(w, steps, W))` batches of B samples each. When the counts of usable
samples per shard are known (local shards) the parts get shares of exactly that size:

- shards >= parts: the pass's shard order is cut into contiguous ranges of usable samples, one per part, sized
  in proportion to the part's batches; a shard is split between two parts where a range ends inside it, and a
  part reads only its range (at most two partial shards);
- fewer shards than parts: every part reads every shard (interleaved alike) and keeps the samples whose place
  in the pass falls into its batches, as map-style data is dealt.

What is left after `steps` global batches (less than one global batch, when the epoch is one pass) is spread
over the parts as spares: a part uses them only to replace samples that turn out unusable when decoded, so
nothing repeats within an epoch unless more samples fail than there are spares.

A `Deal` says who takes what of one pass: `Layout` deals the epoch's own samples (every pass alike);
`harmony.data.mixing.SourceDeal` deals one source of a mix, whose samples go to the parts whose batches drew them.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Protocol


class Deal(Protocol):
    """How pass `pass_no` of a source is dealt to the loader's parts."""

    @property
    def parts(self) -> int: ...

    def shares(self, pass_no: int) -> list[int]:
        """Relative sizes of the parts' contiguous ranges of the pass."""
        ...

    def slot(self, position: int, pass_no: int) -> int:
        """The part that takes the pass's sample at `position` when every part reads the whole pass."""
        ...


@dataclass(frozen=True)
class Layout:
    """Who makes which batch of an epoch: `ranks` x `workers` parts, `local_batch` samples per rank and step,
    `steps` global batches per epoch."""

    ranks: int = 1
    workers: int = 1
    local_batch: int = 1
    steps: int = 1

    @property
    def parts(self) -> int:
        return self.ranks * self.workers

    def batches(self, part: int) -> int:
        """Batches part `part` makes in one epoch."""
        return len(range(part % self.workers, self.steps, self.workers))

    def quota(self, part: int) -> int:
        """Samples part `part` trains in one epoch."""
        return self.batches(part) * self.local_batch

    def shares(self, pass_no: int = 0) -> list[int]:
        """Every pass alike: each part's range sized by the batches it makes."""
        return [self.batches(part) for part in range(self.parts)]

    def slot(self, position: int, pass_no: int = 0) -> int:
        """The part that takes the sample at `position` of a pass: the part making that position's batch, or,
        past the last whole global batch, the parts in turn (spares)."""
        global_batch = self.ranks * self.local_batch
        step = position // global_batch
        if step >= self.steps:
            return (position - self.steps * global_batch) % self.parts
        rank = (position % global_batch) // self.local_batch
        return rank * self.workers + step % self.workers


def proportional(total: int, weights: list[int]) -> list[int]:
    """`total` split into integer sizes proportional to `weights` (largest remainders first, ties to the
    lower index); sizes sum to `total`."""
    weight = sum(weights)
    if weight == 0:
        return [0] * len(weights)
    sizes = [total * w // weight for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % weight), i))
    for i in remainders[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


@dataclass(frozen=True)
class Segment:
    """Usable samples [lo, hi) of one shard; `owns_end`: this part reads the shard to its end, so it is the
    one that reports a shard that cannot be read to its end (and any unusable samples after the last usable
    one)."""

    url: str
    lo: int
    hi: int
    owns_end: bool


def contiguous_segments(urls: list[str], counts: list[int], deal: Deal, part: int, pass_no: int = 0) -> list[Segment]:
    """Part `part`'s share of pass `pass_no` over `urls` (in pass order) with `counts` usable samples each: a
    contiguous range of the pass, sized in proportion to the part's share (module doc)."""
    sizes = proportional(sum(counts), deal.shares(pass_no))
    bounds = list(itertools.accumulate(sizes, initial=0))

    def owner(position: int) -> int:
        """The part whose range holds `position`; past the end, the last part with a range."""
        if position >= bounds[-1]:
            return max((p for p, size in enumerate(sizes) if size), default=deal.parts - 1)
        return bisect.bisect_right(bounds, position) - 1

    segments, offset = [], 0
    for url, count in zip(urls, counts):
        lo, hi = max(bounds[part] - offset, 0), min(bounds[part + 1] - offset, count)
        owns_end = owner(offset + count - 1 if count else offset) == part
        if lo < hi or owns_end:
            segments.append(Segment(url, lo, max(lo, hi), owns_end))
        offset += count
    return segments
