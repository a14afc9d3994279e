"""The two kinds of data failure: `DataError` (from `harmony.core.errors`) stops the run with one line the
user can act on (bad spec, no files, nothing readable); `SampleError` skips one sample and counts it under a
reason."""

from __future__ import annotations

from harmony.core.errors import DataError as DataError

SKIP_REASONS = ("image", "caption", "shard")
# what a batch carries beside its samples: counts for the log (skips per reason; under mixing, samples per source),
# never per sample and never moved to the device
BATCH_COUNTS = ("data_errors", "data_sources")


class SampleError(ValueError):
    """One unusable sample: skipped and counted under `reason` (one of SKIP_REASONS), never fatal."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[SampleError], tuple[str, str]]:
        """Picklable (encoding workers send skips back to the writer)."""
        return SampleError, (self.reason, str(self))
