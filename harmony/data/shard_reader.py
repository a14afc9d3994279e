"""One reading of a WebDataset shard, shared by everything that reads shards (the training loader, the sample
count that sizes an epoch, `harmony data inspect`, retrieval evaluation), so they never disagree on what a
shard holds.

Members are grouped into samples as webdataset does (consecutive members with the same key; the key ends at
the first dot of the file name, so `0001.seg.png` belongs to sample `0001`), except where that reading finds
no image or no caption in a group whose names hold dots in their keys (`img.001.jpg`, `img.001.txt`,
`img.002.jpg`, ...): those are regrouped at the last dot (samples `img.001`, `img.002`). A sample is usable
when it has an image (`IMAGE_EXTENSIONS`) and a caption: `key.txt`, else the `caption` field of `key.json`
(img2dataset writes both), decoded by `decode_text`, control characters and surrounding whitespace removed.
"""

from __future__ import annotations

import json
import os
import tarfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import webdataset as wds

from harmony.data.errors import SampleError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://")
Sample = dict[str, object]
Member = tuple[str, bytes | None]


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES) or "://" in url


def split_first_dot(name: str) -> tuple[str, str]:
    """(key, extension) as webdataset reads a member name: the extension starts at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def split_last_dot(name: str) -> tuple[str, str]:
    """(key, extension) with the extension after the basename's last dot (keys that hold dots)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def clean_caption(text: str) -> str:
    """The caption with control characters (NUL, escape codes, line breaks) read as spaces and surrounding
    whitespace removed: a caption of only those is empty."""
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in text).strip()


def decode_text(data: bytes) -> str:
    """Caption bytes as text: UTF-16 when they start with its byte-order mark, else UTF-8 (a BOM is dropped),
    else Windows-1252, the usual encoding of text exported by older tools."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _text(value: object) -> str:
    return decode_text(value) if isinstance(value, bytes) else str(value)


def caption_of(sample: Sample) -> str:
    """`key.txt`, else the `caption` field of `key.json`, cleaned ('' when neither holds any text); raises
    SampleError naming the sample's members when it has neither file."""
    if "txt" in sample:
        return clean_caption(_text(sample["txt"]))
    if "json" in sample:
        try:
            meta = json.loads(_text(sample["json"]))
        except ValueError:
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return clean_caption(str(meta["caption"]))
        raise SampleError("caption", f"sample {describe_sample(sample)}: its .json has no 'caption' text")
    raise SampleError("caption", f"sample {describe_sample(sample)} has no caption (.txt, or .json with 'caption')")


def image_extension(sample: Sample) -> str | None:
    return next((e for e in IMAGE_EXTENSIONS if e in sample), None)


def describe_sample(sample: Sample) -> str:
    """`key` (members: key.jpg, key.json) for messages."""
    key = str(sample.get("__key__", "?"))
    members = sorted(k for k in sample if not k.startswith("__"))
    return f"{key} (members: {', '.join(f'{key}.{m}' for m in members) or 'none'})"


def header_problem(sample: Sample) -> SampleError | None:
    """Why a sample cannot be used, from its names and caption alone (no pixel is decoded), or None."""
    if image_extension(sample) is None:
        return SampleError("image", f"sample {describe_sample(sample)} has no image ({', '.join(IMAGE_EXTENSIONS)})")
    try:
        caption = caption_of(sample)
    except SampleError as exc:
        return exc
    if not caption:
        return SampleError("caption", f"sample {describe_sample(sample)} has an empty caption")
    return None


def _complete(exts: Iterable[str]) -> bool:
    found = set(exts)
    return bool(found & set(IMAGE_EXTENSIONS)) and bool(found & set(CAPTION_EXTENSIONS))


def _runs(members: list[Member], split: Callable[[str], tuple[str, str]]) -> list[list[tuple[str, str, bytes | None]]]:
    """Consecutive members with the same key, as (key, extension, data)."""
    runs: list[list[tuple[str, str, bytes | None]]] = []
    for name, data in members:
        key, ext = split(name)
        if runs and runs[-1][0][0] == key:
            runs[-1].append((key, ext, data))
        else:
            runs.append([(key, ext, data)])
    return runs


def _samples(run: list[Member], url: str) -> list[Sample]:
    """One webdataset-keyed run of members as samples (regrouped at the last dot where that finds them)."""
    (group,) = _runs(run, split_first_dot)
    groups = [group]
    if not _complete(ext for _, ext, _ in group) and any("." in ext for _, ext, _ in group):
        regrouped = _runs(run, split_last_dot)
        if any(_complete(ext for _, ext, _ in g) for g in regrouped):
            groups = regrouped
    samples = []
    for members in groups:
        sample: Sample = {"__key__": members[0][0], "__url__": url}
        for _, ext, data in members:
            sample.setdefault(ext, data)
        samples.append(sample)
    return samples


def group_samples(members: Iterable[Member], url: str) -> Iterator[Sample]:
    """Samples from consecutive (name, data) members (module doc); data None: the member was not read. When
    reading stops with an error, the sample being read is kept if it is complete (the error is re-raised)."""
    run: list[Member] = []
    try:
        for name, data in members:
            if run and split_first_dot(run[0][0])[0] != split_first_dot(name)[0]:
                yield from _samples(run, url)
                run = []
            run.append((name, data))
    except Exception:
        yield from (s for s in _samples(run, url) if _complete(s)) if run else ()
        raise
    if run:
        yield from _samples(run, url)


@contextmanager
def _open(url: str) -> Iterator[tarfile.TarFile]:
    """A local shard with random access (members not read are seeked over), anything else as a stream."""
    if not is_remote(url) and os.path.isfile(url):
        with tarfile.open(url, "r:*") as tar:
            yield tar
        return
    stream: IO[bytes] = wds.gopen(url, "rb")
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            yield tar
    finally:
        stream.close()


def shard_members(url: str, read: Iterable[str] | None = None) -> Iterator[Member]:
    """(name, data) of the regular members of a shard, in order; only members whose extension (after the
    first or the last dot) is in `read` (default: images and captions) are read, the others come with data
    None. Raises on an unreadable or truncated archive."""
    wanted = set(IMAGE_EXTENSIONS + CAPTION_EXTENSIONS if read is None else read)
    with _open(url) as tar:
        for info in tar:
            if not info.isreg() or Path(info.name).name.startswith("__"):
                continue
            if split_last_dot(info.name)[1] in wanted or split_first_dot(info.name)[1] in wanted:
                handle = tar.extractfile(info)
                yield info.name, handle.read() if handle is not None else b""
            else:
                yield info.name, None


def describe(exc: BaseException) -> str:
    """A short reason from an exception raised while reading an archive."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    if text.startswith("file could not be opened successfully"):  # tarfile tried every compression
        return "empty file" if "empty file" in text else "not a tar archive"
    return text.splitlines()[0] if text else type(exc).__name__


def read_shard(url: str, read: Iterable[str] | None = None) -> Iterator[Sample | SampleError]:
    """The samples of one shard, then one SampleError('shard') if it could not be read to its end."""
    members = shard_members(url, read)
    try:
        yield from group_samples(members, url)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        yield SampleError("shard", f"shard '{url}' is unreadable or truncated: {describe(exc)}")


def named_sample(sample: Sample) -> bool:
    """Whether a sample's member names promise an image and a caption: what a shard's count counts (from tar
    headers alone) and what the loader's split of a pass indexes. Such a sample may still turn out unusable
    (an empty caption, a broken image): it is then skipped and replaced."""
    return image_extension(sample) is not None and any(e in sample for e in CAPTION_EXTENSIONS)


def count_samples(url: str) -> int:
    """The `named_sample`s of a local shard, from its tar headers (nothing is read but names): img2dataset's
    `{shard}_stats.json` count when present. A truncated shard counts what can be read."""
    stats = Path(url).with_name(Path(url).stem + "_stats.json")
    if stats.is_file():
        try:
            successes = json.loads(stats.read_text()).get("successes")
            if isinstance(successes, int):
                return successes
        except (OSError, ValueError):
            pass
    return sum(1 for s in read_shard(url, read=()) if not isinstance(s, SampleError) and named_sample(s))
