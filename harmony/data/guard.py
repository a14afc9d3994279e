"""Bookkeeping for skipped samples: per-reason tallies, the end-of-run line, and the guard that stops
a stream in which nothing is readable (instead of letting the loader spin forever)."""

from __future__ import annotations

import torch

from harmony.data.errors import SKIP_REASONS, DataError, SampleError

REASON_WORDS = {"image": "unreadable image", "caption": "missing or empty caption", "shard": "unreadable shard"}


class SkipTally:
    """Samples skipped since the last `take`, per reason."""

    def __init__(self) -> None:
        self.counts = [0] * len(SKIP_REASONS)
        self.last: SampleError | None = None

    def add(self, error: SampleError) -> None:
        self.counts[SKIP_REASONS.index(error.reason)] += 1
        self.last = error

    def take(self) -> torch.Tensor:
        """The counts as a LongTensor [len(SKIP_REASONS)], then reset."""
        out = torch.tensor(self.counts, dtype=torch.long)
        self.counts = [0] * len(SKIP_REASONS)
        return out


def describe_skips(counts: dict[str, int]) -> str:
    """'data: skipped 3 samples (2 unreadable images, 1 missing or empty caption)' or 'data: nothing skipped'."""
    total = sum(counts.values())
    if total == 0:
        return "data: nothing skipped"
    parts = [f"{n} {REASON_WORDS[r]}{'s' if n != 1 else ''}" for r, n in counts.items() if n]
    return f"data: skipped {total} sample{'s' if total != 1 else ''} ({', '.join(parts)})"


class ReadGuard:
    """Raises DataError when a part's stream has read every shard of the spec since its last usable
    sample (so a lone broken shard, or a pass that happened to draw only broken shards, is not fatal,
    while a stream where nothing is readable fails instead of spinning forever)."""

    def __init__(self, spec: str, urls: list[str], part: int, parts: int) -> None:
        self.spec, self.urls, self.part, self.parts = spec, set(urls), part, parts
        self.read: set[str] = set()
        self.used = self.failures = 0
        self.last: SampleError | None = None

    def ok(self) -> None:
        self.used += 1

    def failed(self, error: SampleError) -> None:
        self.failures += 1
        self.last = error

    def end_pass(self, shards: tuple[str, ...]) -> None:
        """Call after every sample of the pass has been used or skipped."""
        self.read.update(shards)
        if not self.read >= self.urls:
            return
        if self.used == 0 and self.failures == 0:
            raise DataError(
                f"loader part {self.part + 1} of {self.parts} (ranks x workers) got no samples from '{self.spec}': "
                "it holds fewer samples than parts; lower data.num_workers"
            )
        if self.used == 0:
            raise DataError(f"nothing readable in '{self.spec}' ({self.failures} samples skipped; last: {self.last})")
        self.read, self.used, self.failures = set(), 0, 0


def worker_message(error: DataError) -> str:
    """The original one-line message of a DataError, also when a DataLoader worker re-raised it with its
    traceback ('Caught DataError in DataLoader worker ... harmony.data.errors.DataError: <message>')."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return "data error"
    last = lines[-1]
    marker = "DataError: "
    return last.split(marker, 1)[1] if len(lines) > 1 and marker in last else last
