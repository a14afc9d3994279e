"""The two kinds of data failure: `DataError` stops the run with one line the user can act on (bad spec,
no files, nothing readable); `SampleError` skips one sample and counts it under a reason."""

from __future__ import annotations

SKIP_REASONS = ("image", "caption", "shard")


class DataError(ValueError):
    """A data problem the user can fix (bad spec, no files); the message says what and where."""


class SampleError(ValueError):
    """One unusable sample: skipped and counted under `reason` (one of SKIP_REASONS), never fatal."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[SampleError], tuple[str, str]]:
        """Picklable (encoding workers send skips back to the writer)."""
        return SampleError, (self.reason, str(self))
