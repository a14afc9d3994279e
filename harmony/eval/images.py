"""Reading a user's image files for evaluation: unreadable ones are skipped and counted, never fatal.

Evaluation sets come from users' folders, and one zero-byte, truncated or oversized file must not end a
long run with a traceback, nor silently change the numbers. `read_image` opens a file the way training
does (`open_image`: header first, decompression bombs refused), composites transparency over a
background (`to_rgb`) and turns every failure into a `SampleError`. Datasets hand such errors out in
place of a sample; `SkippingLoader` leaves them out of the batches and counts them in a `Skips`, which
each protocol reports in its JSON (`dataset.skipped`) and on stderr.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from harmony.core.colors import WHITE
from harmony.data.decode import DEFAULT_MAX_PIXELS, open_image, upright
from harmony.data.errors import DataError, SampleError
from harmony.data.rgb import to_rgb

Colour = tuple[int, int, int]
B = TypeVar("B")
EXAMPLES = 3


def read_image(path: Path, background: Colour = WHITE, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The RGB pixels of an image file, transparency composited over `background`; SampleError otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SampleError("image", f"cannot read '{path}': {exc.strerror or exc}") from None
    try:
        image = open_image(data, max_pixels)
    except SampleError as exc:
        raise SampleError("image", f"'{path}': {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            return to_rgb(upright(image), background)
    except Exception as exc:  # truncated or corrupt data surfaces here, in whatever type the codec raises
        raise SampleError("image", f"'{path}': image data unreadable ({type(exc).__name__}: {exc})") from None


def background_name(background: Colour) -> str:
    """'white' or 'r,g,b': how a background is shown in results (and `parse_background` reads back)."""
    return "white" if tuple(background) == WHITE else ",".join(str(c) for c in background)


class Skips:
    """Samples left out of one evaluation: a count per reason and the first few messages."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.examples: list[str] = []

    def __len__(self) -> int:
        return sum(self.reasons.values())

    def add(self, error: SampleError) -> None:
        self.reasons[error.reason] += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(str(error))

    def merge(self, record: dict[str, Any]) -> None:
        """Add a recorded `as_dict()` (e.g. from the feature cache)."""
        self.reasons.update(record.get("reasons", {}))
        self.examples.extend(record.get("examples", [])[: max(0, EXAMPLES - len(self.examples))])

    def as_dict(self) -> dict[str, Any]:
        return {"count": len(self), "reasons": dict(self.reasons), "examples": list(self.examples)}


def skip_line(task: str, skipped: dict[str, Any]) -> str | None:
    """The one stderr line that reports skipped samples (None when nothing was skipped)."""
    if not skipped.get("count"):
        return None
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped["reasons"].items()))
    first = skipped["examples"][0] if skipped.get("examples") else ""
    return (
        f"harmony eval {task}: skipped {skipped['count']} unreadable sample(s) ({reasons}; see dataset.skipped "
        f"in the JSON); first: {first}"
    )


def either(get: Callable[[int], Any], i: int) -> Any:
    """`get(i)`, or the SampleError it raised (what a skipping dataset hands out for a bad sample)."""
    try:
        return get(i)
    except SampleError as exc:
        return exc


class SkippingLoader(Generic[B]):
    """A DataLoader over a dataset that may hand out SampleErrors: they are counted in `skips` and left
    out of the batches (a batch left empty is dropped). `len()` is the DataLoader's number of batches."""

    def __init__(
        self,
        dataset: Dataset[Any],
        skips: Skips,
        collate: Callable[[list[Any]], B] = default_collate,
        **loader_args: Any,
    ) -> None:
        def split(items: list[Any]) -> tuple[list[SampleError], B | None]:
            good = [item for item in items if not isinstance(item, SampleError)]
            errors = [item for item in items if isinstance(item, SampleError)]
            return errors, (collate(good) if good else None)

        self.loader = DataLoader(dataset, collate_fn=split, **loader_args)
        self.skips = skips

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[B]:
        for errors, batch in self.loader:
            for error in errors:
                self.skips.add(error)
            if batch is not None:
                yield batch


def require_some(count: int, skips: Skips, name: str) -> None:
    """DataError when every sample of `name` was unreadable (no number to report)."""
    if count == 0:
        first = f"; first: {skips.examples[0]}" if skips.examples else ""
        raise DataError(f"no readable image in '{name}' ({len(skips)} skipped){first}")
