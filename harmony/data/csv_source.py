"""CSV/TSV image-caption tables (open_clip's convention): a header row, an image-path column and a
caption column (named by `data.csv_image_key` / `data.csv_caption_key`), image paths relative to the
table's folder unless absolute.

Rows are packed into two byte tables rather than millions of Python strings, so a CC3M-sized table
costs its text size once and stays shared (copy-on-write) with the loader's worker processes.
"""

from __future__ import annotations

import csv
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from harmony.config import DataConfig
from harmony.data.decode import RawSample, open_image
from harmony.data.errors import DataError, SampleError

SEPARATORS = {"comma": ",", "tab": "\t"}


class StringTable:
    """Strings packed as UTF-8 into one uint8 array with int64 offsets (no per-string objects)."""

    def __init__(self, blob: bytes, offsets: array[int]) -> None:
        self._blob = np.frombuffer(blob, dtype=np.uint8)
        self._offsets = np.frombuffer(offsets.tobytes(), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._blob[start:end].tobytes().decode("utf-8")


def pack_columns(rows: Iterable[tuple[str, ...]], width: int) -> list[StringTable]:
    """One StringTable per column, filled in a single pass over `rows`."""
    blobs = [bytearray() for _ in range(width)]
    offsets = [array("q", [0]) for _ in range(width)]
    for row in rows:
        for blob, offset, text in zip(blobs, offsets, row):
            blob += text.encode("utf-8")
            offset.append(len(blob))
    return [StringTable(bytes(b), o) for b, o in zip(blobs, offsets)]


def separator_for(path: Path, setting: str) -> str:
    """`auto` (tab for .tsv, comma otherwise), a name in SEPARATORS, or one literal character."""
    if setting == "auto":
        return "\t" if path.suffix.lower() == ".tsv" else ","
    sep = SEPARATORS.get(setting, setting)
    if len(sep) != 1:
        raise DataError(f"data.csv_separator must be auto, comma, tab or one character, not '{setting}'")
    return sep


def read_columns(path: Path, columns: tuple[str, str], separator: str) -> Iterator[tuple[str, str]]:
    """(image path, caption) per non-blank row; a short row yields '' for what it lacks."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig", errors="replace")  # -sig: Excel writes a BOM
    except OSError as exc:
        raise DataError(f"cannot read '{path}': {exc.strerror}") from None
    with handle:
        rows = csv.reader(handle, delimiter=separator)
        header = [name.strip() for name in next(rows, [])]
        if not header:
            raise DataError(f"'{path}' is empty: expected a header row with '{columns[0]}' and '{columns[1]}'")
        missing = [c for c in columns if c not in header]
        if missing:
            found = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
            raise DataError(
                f"'{path}' has no column '{missing[0]}' (columns: {found}); "
                "set data.csv_image_key / data.csv_caption_key (or data.csv_separator)"
            )
        at = [header.index(c) for c in columns]
        for row in rows:
            if row:
                yield tuple(row[i] if i < len(row) else "" for i in at)  # type: ignore[misc]


class CsvSource:
    """Map-style (image, caption) rows of a CSV/TSV file; unusable rows raise SampleError on load."""

    def __init__(self, path: Path, cfg: DataConfig) -> None:
        self.path, self.max_pixels = path, cfg.max_image_pixels
        columns = (cfg.csv_image_key, cfg.csv_caption_key)
        rows = read_columns(path, columns, separator_for(path, cfg.csv_separator))
        self.images, self.captions = pack_columns(rows, 2)
        if not len(self.images):
            raise DataError(f"'{path}' has a header but no rows")
        self.root = path.resolve().parent

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.root / self.images[index]

    def load(self, index: int) -> RawSample:
        caption = self.captions[index].strip()
        if not caption:
            raise SampleError("caption", f"{self.path} row {index + 1} has an empty caption")
        if not self.images[index].strip():
            raise SampleError("image", f"{self.path} row {index + 1} has no image path")
        path = self.image_path(index)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SampleError("image", f"cannot read '{path}': {exc.strerror}") from None
        return RawSample(str(index), open_image(data, self.max_pixels), caption)
