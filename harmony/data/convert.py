"""`harmony data from-csv` / `from-folder`: image-caption pairs -> WebDataset shards (img2dataset layout:
`key.jpg|png|webp` + `key.txt` + `key.json`). Images are checked by a full decode; unreadable ones and
empty captions are skipped and counted. `resize` shrinks images whose short side is larger (JPEG out);
JPEG/PNG/WebP files that need no resize or EXIF rotation are copied byte for byte; other images are
re-encoded as upright JPEGs, transparency composited on the chosen background.

Pairs are shuffled (seeded) before sharding: folders and exports are usually sorted by class, and a
shard holding one class gives single-class batches. `{prefix}-conversion.json` records the seed.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import signal
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from harmony.config import DataConfig
from harmony.core.colors import WHITE
from harmony.data.csv_source import CsvSource
from harmony.data.decode import IMAGE_FILE_SUFFIXES, open_image, orientation, upright
from harmony.data.errors import SKIP_REASONS, DataError, SampleError
from harmony.data.guard import describe_skips
from harmony.data.rgb import to_rgb
from harmony.data.shard_reader import decode_text
from harmony.data.shards import ShardWriter
from harmony.typed import ConfigError

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class Pending:
    """One pair to write: the image as named by the user, where it is, and its caption ('' if none)."""

    name: str
    path: Path
    caption: str
    problem: SampleError | None = None  # known before reading (a URL in a table): the pair is skipped with it


@dataclass(frozen=True)
class EncodeOptions:
    resize: int = 0
    quality: int = 95
    max_pixels: int = DataConfig.max_image_pixels
    background: tuple[int, int, int] = WHITE


def check_template(template: str) -> None:
    """ConfigError unless `template`'s only placeholder is {label}."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"--caption-template {template!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    unknown = [name for name in fields if name != "label"]
    if unknown:
        raise ConfigError(
            f"--caption-template {template!r} has the placeholder {{{unknown[0]}}}; "
            "the only one is {label} (the image's folder name)"
        )


def readable(name: str) -> str:
    """A file or folder name as text: names that are not UTF-8 on disk (Python keeps their bytes as
    surrogates, which cannot be written as UTF-8) are read as Windows-1252, like captions."""
    return decode_text(name.encode("utf-8", "surrogateescape"))


def folder_pairs(root: Path, caption_template: str = "") -> list[Pending]:
    """Images under `root` (recursive, sorted); caption from a sidecar `name.txt`, else `caption_template`
    with {label} = the parent folder's name (underscores as spaces)."""
    check_template(caption_template)
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder")
    pairs = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_FILE_SUFFIXES and p.is_file()):
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            caption = decode_text(sidecar.read_bytes())
        elif caption_template and path.parent != root:
            caption = caption_template.format(label=readable(path.parent.name).replace("_", " "))
        else:
            caption = ""
        pairs.append(Pending(readable(str(path.relative_to(root))), path, caption))
    if not pairs:
        raise DataError(f"folder '{root}' holds no images ({', '.join(sorted(IMAGE_FILE_SUFFIXES))})")
    return pairs


def csv_pairs(path: Path, cfg: DataConfig) -> list[Pending]:
    source = CsvSource(path, cfg)
    pairs = []
    for i in range(len(source)):
        try:
            pairs.append(Pending(source.images[i], source.image_path(i), source.captions[i]))
        except SampleError as exc:
            pairs.append(Pending(source.images[i], path, source.captions[i], exc))
    return pairs


def shrink(image: Image.Image, short_side: int, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """RGB copy whose shorter side is `short_side` (reduced-scale JPEG decode first when possible)."""
    width, height = image.size
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image.draft("RGB", size)
    return to_rgb(image, background).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode(pending: Pending, options: EncodeOptions) -> dict[str, bytes] | SampleError:
    """Shard members for one pair, or the reason it is skipped."""
    if pending.problem is not None:
        return pending.problem
    caption = pending.caption.strip()
    if not caption:
        return SampleError(
            "caption",
            f"{pending.name}: no caption (no .txt beside it; --caption-template 'a photo of a {{label}}.' captions every image)",
        )
    try:
        data = pending.path.read_bytes()
        image = open_image(data, options.max_pixels)
        original = image.size
        ext = KEPT_FORMATS.get(image.format or "")
        needs_resize = bool(options.resize) and min(original) > options.resize
        turn = orientation(image)
        if needs_resize:
            image = upright(shrink(image, options.resize, options.background), turn)
        elif turn != 1 or ext is None:
            image = upright(to_rgb(image, options.background), turn)
        if needs_resize or turn != 1 or ext is None:
            data, ext = jpeg_bytes(image, options.quality), "jpg"
        else:
            image.load()  # a full decode: a truncated file is caught here rather than during training
    except SampleError as exc:
        return SampleError(exc.reason, f"{pending.name}: {exc}")
    except Exception as exc:  # unreadable file or codec failure: this pair is skipped
        return SampleError("image", f"{pending.name}: {type(exc).__name__}: {exc}")
    meta = {
        "source": pending.name,
        "caption": caption,
        "width": image.size[0],
        "height": image.size[1],
        "original_width": original[0],
        "original_height": original[1],
    }
    return {ext: data, "txt": caption.encode(), "json": json.dumps(meta).encode()}


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    """An RGB image as JPEG file bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass
class WriteReport:
    samples: int
    shards: list[Path]
    skipped: dict[str, int]
    first_problem: str

    def summary(self, out: Path) -> str:
        line = f"wrote {self.samples} samples to {len(self.shards)} shard(s) in {out}; "
        line += describe_skips(self.skipped).removeprefix("data: ")
        return line + (f" (first: {self.first_problem})" if self.first_problem else "")


def encoded(pairs: Sequence[Pending], options: EncodeOptions, workers: int) -> Iterator[dict[str, bytes] | SampleError]:
    """Encode in order, in `workers` processes when > 1 (which leave Ctrl-C to this one)."""
    job = partial(encode, options=options)
    if workers <= 1:
        yield from map(job, pairs)
        return
    with multiprocessing.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        yield from pool.imap(job, pairs, chunksize=8)


def write_shards(
    pairs: Sequence[Pending],
    out: Path,
    per_shard: int = 1000,
    options: EncodeOptions | None = None,
    workers: int = 0,
    prefix: str = "shard",
    progress: bool = True,
    shuffle_seed: int | None = 0,
) -> WriteReport:
    """Write `pairs` as shards of `per_shard` samples with keys 000000000, 000000001, ..., in an order
    shuffled by `shuffle_seed` (None: as given)."""
    if shuffle_seed is not None:
        pairs = list(pairs)
        random.Random(shuffle_seed).shuffle(pairs)
    skipped, first = dict.fromkeys(SKIP_REASONS, 0), ""
    results = tqdm(
        encoded(pairs, options or EncodeOptions(), workers), total=len(pairs), unit="img", disable=not progress
    )
    with ShardWriter(out, per_shard, prefix) as writer:
        for result in results:
            if isinstance(result, SampleError):
                skipped[result.reason] += 1
                first = first or str(result)
                continue
            writer.write(f"{writer.samples:09d}", result)
    if writer.samples == 0:
        raise DataError(f"no usable image-caption pair among {len(pairs)} (first problem: {first})")
    return WriteReport(writer.samples, writer.shards, skipped, first)
