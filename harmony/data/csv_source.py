"""CSV/TSV image-caption tables (open_clip's convention): a header row, an image-path column and a
caption column (named by `data.csv_image_key` / `data.csv_caption_key`, or `--image-key` /
`--caption-key` in the data and eval commands), image paths relative to the table's folder unless
absolute. Files as other tools write them are read as meant: a UTF-8 BOM (Excel), an unnamed index
column (pandas), quoted fields with separators and line breaks, CRLF line ends, a space after the
separator, Windows backslashes in relative paths. A file that is not UTF-8 is refused (no silently garbled captions).

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
from harmony.data.shard_reader import is_remote

SEPARATORS = {"comma": ",", "tab": "\t"}
FLAGS = {"csv_image_key": "--image-key", "csv_caption_key": "--caption-key", "csv_separator": "--separator"}


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


def how_to_set(key: str, value: str) -> str:
    """Both spellings of a CSV setting: the config key (train) and the flag (data and eval commands)."""
    return f"data.{key}={value} (train) or {FLAGS[key]} {value} (data/eval commands)"


def missing_column(path: Path, header: list[str], missing: str, key: str, separator: str) -> DataError:
    """The error for a column the table lacks: its columns and the settings that name another one."""
    found = ", ".join(repr(h) for h in header[:8]) + (", ..." if len(header) > 8 else "")
    message = (
        f"'{path}' has no column '{missing}' (its columns: {found}); name the column with {how_to_set(key, 'COL')}"
    )
    others = [name for name, sep in (("tab", "\t"), ("comma", ","), (";", ";")) if sep != separator]
    if len(header) == 1 and (split := next((n for n in others if SEPARATORS.get(n, n) in header[0]), None)):
        message += f"; the header looks {split}-separated: {how_to_set('csv_separator', split)}"
    return DataError(message)


def read_columns(path: Path, columns: tuple[str, str], separator: str) -> Iterator[tuple[str, str]]:
    """(image path, caption) per non-blank row; a short row yields '' for what it lacks."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read '{path}': {exc.strerror}") from None
    with handle:
        rows = csv.reader(handle, delimiter=separator, skipinitialspace=True)
        try:
            header = [name.strip() for name in next(rows, [])]
            if not header:
                raise DataError(f"'{path}' is empty: expected a header row with '{columns[0]}' and '{columns[1]}'")
            for column, key in zip(columns, ("csv_image_key", "csv_caption_key")):
                if column not in header:
                    raise missing_column(path, header, column, key, separator)
            at = [header.index(c) for c in columns]
            for row in rows:
                if row:
                    yield tuple(row[i] if i < len(row) else "" for i in at)  # type: ignore[misc]
        except UnicodeDecodeError:
            raise not_utf8(path) from None


def not_utf8(path: Path) -> DataError:
    """The error for a table that is not UTF-8, naming the first bad byte's line."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        where = ""
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        where = f" (byte {data[exc.start]:#x} on line {line})"
    return DataError(
        f"'{path}' is not UTF-8{where}: save it as UTF-8, e.g. iconv -f cp1252 -t utf-8 '{path}' > fixed{path.suffix}"
    )


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
        head = [self.images[i].strip() for i in range(min(len(self.images), 1000))]
        if all(is_remote(name) for name in head):
            raise DataError(
                f"the image column '{cfg.csv_image_key}' of '{path}' holds URLs (e.g. '{head[0]}'): Harmony reads local "
                "image files and downloads nothing; fetch the images first (img2dataset writes shards Harmony reads)"
            )

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        """Where row `index`'s image is: relative paths from the table's folder (Windows `\\` read as `/`);
        SampleError for a URL (nothing is downloaded)."""
        name = self.images[index].strip()
        if is_remote(name):
            raise SampleError("image", f"{self.path} row {index + 1}: '{name}' is a URL (images are not downloaded)")
        path = self.root / name
        if "\\" in name and not path.exists():
            path = self.root / name.replace("\\", "/")
        return path

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
