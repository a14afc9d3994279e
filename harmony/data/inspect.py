"""`harmony data inspect SPEC`: what a dataset holds and what the model will see.

Reads the first `limit` samples in order (decoding every image fully, as training would), counts
usable and skipped samples per reason, summarises image sizes and caption lengths (words, and CLIP
tokens before truncation against the preset's context), warns when the stored order looks sorted (by
folder or caption: such shards give one-class batches), and draws a contact sheet: per sample its
caption, the image, and the preset's augmented global crops (iBOT-masked or MAE-removed patches
darkened) and local crops.
"""

from __future__ import annotations

import itertools
import json
import posixpath
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from harmony.data.csv_source import CsvSource
from harmony.data.decode import RawSample, decode_pixels, upright, upright_size
from harmony.data.errors import SKIP_REASONS, SampleError
from harmony.data.guard import describe_skips
from harmony.data.loader import MapSource
from harmony.data.rgb import to_rgb
from harmony.data.sources import OPEN_SHARDS, ShardSource, decode_sample, read_shard
from harmony.data.views import ViewMaker
from harmony.models.tokenizer import CaptionTokenizer

TILE = 128  # display size of a global crop in the contact sheet
ORDER_WINDOW = 1000  # usable samples whose folder and caption the sort check looks at


@dataclass
class Scan:
    scanned: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    problems: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    words: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    samples: list[RawSample] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    exhausted: bool = False

    @property
    def usable(self) -> int:
        return len(self.words)


def in_order(source: MapSource | ShardSource, max_pixels: int) -> Iterator[RawSample | SampleError]:
    """Samples of one pass in stored order (shards in spec order), SampleError for what cannot be used."""
    if isinstance(source, ShardSource):
        for item in itertools.chain.from_iterable(read_shard(url) for url in source.urls):
            if isinstance(item, SampleError):
                yield item
                continue
            try:
                raw = decode_sample(item, max_pixels)
            except SampleError as exc:
                yield exc
                continue
            raw.origin = recorded_source(item)
            yield raw
        return
    for index in range(len(source)):
        try:
            raw = source.load(index)
        except SampleError as exc:
            yield exc
            continue
        if isinstance(source, CsvSource):
            raw.origin = source.images[index]
        yield raw


def recorded_source(sample: dict[str, object]) -> str:
    """The original file name our converters record in `key.json` ('source'), else ''."""
    data = sample.get("json")
    try:
        meta = json.loads(data) if isinstance(data, bytes) else None
    except ValueError:
        return ""
    return str(meta.get("source", "")) if isinstance(meta, dict) else ""


@cache
def untruncated() -> CaptionTokenizer:
    """A tokenizer that never truncates, to count what a caption would need."""
    return CaptionTokenizer(1 << 30)


def scan(items: Iterator[RawSample | SampleError], limit: int, keep: int, problems: int = 5) -> Scan:
    """Decode up to `limit` samples (0: all), tally them (caption tokens before truncation), keep the first
    `keep` usable ones."""
    out, items = Scan(), iter(items)
    for item in itertools.islice(items, limit or None):
        out.scanned += 1
        if isinstance(item, RawSample):
            try:
                decode_pixels(item.image, [])
            except SampleError as exc:
                item = exc
        if isinstance(item, SampleError):
            out.skipped[item.reason] += 1
            if len(out.problems) < problems:
                out.problems.append(str(item))
            continue
        out.sizes.append(upright_size(item.image))
        out.words.append(len(item.caption.split()))
        out.tokens.append(len(untruncated().encode(item.caption)))
        if len(out.captions) < ORDER_WINDOW:
            out.captions.append(item.caption)
            out.folders.append(posixpath.dirname(item.origin.replace("\\", "/")) if item.origin else "")
        if len(out.samples) < keep:
            out.samples.append(item)
    out.exhausted = next(items, None) is None
    return out


def grouped(keys: list[str]) -> float | None:
    """How often neighbours share a key, when that is far above chance (a sorted order); else None."""
    if len(keys) < 20 or len(set(keys)) < 2:
        return None
    same = sum(a == b for a, b in itertools.pairwise(keys)) / (len(keys) - 1)
    chance = sum((n / len(keys)) ** 2 for n in Counter(keys).values())
    return same if same >= max(0.8, chance + 0.2) else None


def order_warnings(result: Scan) -> list[str]:
    """Warnings when the samples look stored by class: by folder, by caption, or alphabetically by caption."""
    why = ""
    folders = result.folders if all(result.folders) else []
    captions = result.captions
    if (share := grouped(folders)) is not None:
        why = f"by folder ({share:.0%} of neighbours share a folder)"
    elif (share := grouped(captions)) is not None:
        why = f"by caption ({share:.0%} of neighbours share their caption)"
    elif len(captions) >= 20 and len(set(captions)) > 1:
        ascending = sum(a <= b for a, b in itertools.pairwise(captions)) / (len(captions) - 1)
        if ascending >= 0.95:
            why = f"alphabetically by caption ({ascending:.0%} of neighbours in order)"
    elif len(captions) >= 20 and len(set(captions)) == 1 and not result.exhausted:
        why = f"by caption (the first {len(captions)} usable samples all read {captions[0]!r})"
    if not why:
        return []
    return [
        f"warning: consecutive samples look sorted {why}: shards in this order give batches of one class "
        f"(training reads {OPEN_SHARDS} shards at a time per loader worker, which helps only across shards); "
        "rewrite them with `harmony data from-folder` / `from-csv`, which shuffle before sharding"
    ]


def caption_warnings(result: Scan) -> list[str]:
    """A warning when every caption of the whole set is the same: image-text objectives cannot learn from it."""
    captions = result.captions
    if not result.exhausted or len(captions) < 2 or len(captions) < result.usable or len(set(captions)) > 1:
        return []
    return [
        f"warning: all {len(captions)} captions read {captions[0]!r}: a contrast between images and captions "
        "cannot tell the images apart (CLIP, SigLIP, MLM learn nothing from them); give each image its own caption, "
        "e.g. `harmony data from-folder --caption-template 'a photo of a {label}'`"
    ]


def long_share(result: Scan, context_length: int) -> float:
    """Percentage of usable captions longer than the context (before truncation, start/end included)."""
    return float(np.mean(np.array(result.tokens) > context_length)) * 100 if result.tokens else 0.0


def summary(result: Scan, context_length: int) -> dict[str, Any]:
    """The counts as JSON-ready values."""
    return {
        "scanned": result.scanned,
        "usable": result.usable,
        "skipped": result.skipped,
        "words": result.words,
        "context_length": context_length,
        "exceed_context_percent": long_share(result, context_length),
        "order_warnings": order_warnings(result),
    }


def histogram(values: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """Text histogram with integer bin edges."""
    if not values:
        return []
    low, high = min(values), max(values)
    step = max(1, -(-(high - low + 1) // bins))
    counts = np.bincount([(v - low) // step for v in values])
    most = max(int(counts.max()), 1)
    lines = []
    for i, count in enumerate(counts.tolist()):
        start = low + i * step
        label = f"{start}-{start + step - 1}" if step > 1 else f"{start}"
        lines.append(f"  {label:>9} {'#' * round(width * count / most):<{width}} {count}")
    return lines


def report(result: Scan, context_length: int) -> list[str]:
    skipped = sum(result.skipped.values())
    lines = [f"scanned {result.scanned} samples: {result.usable} usable; {describe_skips(result.skipped)}"]
    lines += [f"  e.g. {p}" for p in result.problems[: min(skipped, len(result.problems))]]
    if not result.usable:
        return lines
    areas = sorted(result.sizes, key=lambda s: s[0] * s[1])
    lines.append(f"image sizes: smallest {areas[0][0]}x{areas[0][1]}, median {areas[len(areas) // 2][0]}x")
    lines[-1] += f"{areas[len(areas) // 2][1]}, largest {areas[-1][0]}x{areas[-1][1]}"
    words = np.array(result.words)
    lines.append(
        f"caption length (words): min {words.min()}, median {int(np.median(words))}, max {words.max()}; "
        f"{long_share(result, context_length):.1f}% exceed the {context_length}-token context and are truncated"
    )
    return lines + histogram(result.words) + order_warnings(result) + caption_warnings(result)


def _font(size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def tile(crop: torch.Tensor, hidden: torch.Tensor | None, size: int) -> Image.Image:
    """A uint8 [3, S, S] crop at display `size`, patches where `hidden` [gh, gw] is True darkened."""
    pixels = crop.permute(1, 2, 0).numpy()
    if hidden is not None:
        gh, gw = hidden.shape
        cover = np.kron(hidden.numpy(), np.ones((pixels.shape[0] // gh, pixels.shape[1] // gw), dtype=bool))
        pixels = pixels.copy()
        pixels[cover] = pixels[cover] // 4
    return Image.fromarray(np.ascontiguousarray(pixels)).resize((size, size), Image.Resampling.NEAREST)


def hidden_patches(views: dict[str, torch.Tensor], maker: ViewMaker) -> list[torch.Tensor | None]:
    """Per global crop, the patches a student does not see: iBOT masks, else MAE's removed patches."""
    count = views["global"].shape[0]
    if "ibot_mask" in views:
        return list(views["ibot_mask"])
    if "mae_keep" not in views:
        return [None] * count
    out: list[torch.Tensor | None] = [None] * count
    for crop, keep in zip(maker.dropped, views["mae_keep"]):
        hidden = torch.ones(maker.grid[0] * maker.grid[1], dtype=torch.bool)
        hidden[keep] = False
        out[crop] = hidden.view(maker.grid)
    return out


def masked_caption(tokens: torch.Tensor, tokenizer: CaptionTokenizer) -> str:
    """The caption as the masked-language student reads it, masked pieces shown as [MASK]."""
    words = tokenizer.words(tokens)
    parts = []
    for is_mask, group in itertools.groupby(words, key=lambda t: t == tokenizer.mask_id):
        run = list(group)
        parts.append(" ".join(["[MASK]"] * len(run)) if is_mask else tokenizer.decode(run))
    return " ".join(parts)


def sample_row(
    raw: RawSample, views: dict[str, torch.Tensor], maker: ViewMaker, tokenizer: CaptionTokenizer
) -> Image.Image:
    """Caption line(s) above the image and its augmented views."""
    original = upright(to_rgb(raw.image, maker.background))
    scale = TILE / original.height
    tiles = [original.resize((max(1, min(2 * TILE, round(original.width * scale))), TILE))]
    tiles += [tile(c, h, TILE) for c, h in zip(views["global"], hidden_patches(views, maker))]
    if "local" in views:
        size = max(8, round(TILE * views["local"].shape[-1] / views["global"].shape[-1]))
        tiles += [tile(c, None, size) for c in views["local"]]
    width = sum(t.width for t in tiles) + 4 * (len(tiles) + 1)
    chars = max(20, width // 7)
    lines = textwrap.wrap(f"{raw.key}: {raw.caption}", chars)[:2]
    if "text_masked" in views:
        lines += textwrap.wrap("masked: " + masked_caption(views["text_masked"], tokenizer), chars)[:1]
    text_height = 16 * len(lines) + 4
    row = Image.new("RGB", (width, text_height + TILE + 8), "white")
    draw = ImageDraw.Draw(row)
    for i, line in enumerate(lines):
        draw.text((4, 2 + 16 * i), line, fill="black", font=_font())
    x = 4
    for t in tiles:
        row.paste(t, (x, text_height))
        x += t.width + 4
    return row


def contact_sheet(
    samples: list[RawSample], maker: ViewMaker, tokenizer: CaptionTokenizer, title: str, seed: int = 0
) -> Image.Image:
    """All sample rows stacked under a one-line legend."""
    rows = [sample_row(raw, maker(raw.image, raw.caption, seed + i), maker, tokenizer) for i, raw in enumerate(samples)]
    width = max([r.width for r in rows] + [600])
    sheet = Image.new("RGB", (width, 24 + sum(r.height for r in rows)), "white")
    ImageDraw.Draw(sheet).text((4, 4), title, fill="black", font=_font(13))
    y = 24
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    return sheet
