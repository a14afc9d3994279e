"""`harmony data ...`: dataset tools (synth, from-csv, from-folder -> shards; inspect).

Every count flag is checked and every output path is checked for writability before any work starts,
so a mistake costs one line and no lost computation. Parsers import nothing heavy (no torch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmony.config import BuiltinDataConfig, ConfigError, DataConfig
from harmony.outputs import OutputError, check_output_dir, check_output_file

if TYPE_CHECKING:
    from harmony.data.convert import Pending


def check_counts(args: argparse.Namespace, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """ConfigError naming the flag when a count is out of range (a zero shard size would write one-sample shards)."""
    for dest in positive + non_negative:
        value = getattr(args, dest)
        if value < 0 or (value == 0 and dest in positive):
            need = "positive" if dest in positive else ">= 0"
            raise ConfigError(f"--{dest.replace('_', '-')} must be {need}, got {value}")


def old_shards(out: str, prefix: str, overwrite: bool) -> list[Path]:
    """Checks the shard folder is writable; returns the shards of this prefix already in it, which would be
    read together with the new ones: refused unless `overwrite` (the caller removes them just before writing)."""
    folder = check_output_dir(out)
    if not prefix or "/" in prefix or "\\" in prefix:
        raise ConfigError(f"--prefix must be a plain file name prefix, got {prefix!r}")
    old = sorted(folder.glob(f"{prefix}-*.tar")) if folder.is_dir() else []
    if old and not overwrite:
        raise OutputError(
            f"--out {folder} already holds {len(old)} shard(s) named {prefix}-*.tar: "
            "add --overwrite to replace them, or choose another folder"
        )
    return old


def cmd_synth(args: argparse.Namespace) -> int:
    check_counts(args, positive=("num", "shard_size"), non_negative=("image_size",))
    if not 0.0 <= args.mismatch_rate <= 1.0:
        raise ConfigError(f"--mismatch-rate must be in [0, 1], got {args.mismatch_rate}")
    old = old_shards(args.out, args.split, args.overwrite)
    from harmony.data.shapes import ShapesDataset
    from harmony.data.shards import write_shapes

    defaults = BuiltinDataConfig()
    dataset = ShapesDataset(args.split, args.num, args.image_size or defaults.image_size, args.seed, args.mismatch_rate)
    for path in old:
        path.unlink()
    shards = write_shapes(dataset, Path(args.out), args.shard_size, progress=not args.no_progress)
    print(f"wrote {len(dataset)} {args.split} samples to {len(shards)} shard(s) in {args.out}")
    return 0


def _background(value: str) -> tuple[int, int, int]:
    from harmony.core.colors import parse_background

    try:
        return parse_background(value)
    except ValueError as exc:
        raise ConfigError(f"--alpha-background: {exc}") from None


def _check_writer(args: argparse.Namespace) -> list[Path]:
    """Checks the writer flags and --out before any work; returns the shards --overwrite replaces."""
    check_counts(args, positive=("shard_size",), non_negative=("resize", "workers"))
    if not 1 <= args.quality <= 100:
        raise ConfigError(f"--quality must be in 1..100, got {args.quality}")
    _background(args.alpha_background)
    return old_shards(args.out, args.prefix, args.overwrite)


def _write(args: argparse.Namespace, old: list[Path], source: str, pairs: list[Pending]) -> int:
    """Write the shards and `{prefix}-conversion.json`, the record of what was done with which settings."""
    from harmony.data.convert import EncodeOptions, write_shards

    for path in old:
        path.unlink()
    out = Path(args.out)
    options = EncodeOptions(
        args.resize, args.quality, DataConfig().max_image_pixels, _background(args.alpha_background)
    )
    seed = None if args.keep_order else args.seed
    result = write_shards(pairs, out, args.shard_size, options, args.workers, args.prefix, not args.no_progress, seed)
    record: dict[str, Any] = {
        "command": args.data_command,
        "source": source,
        "samples": result.samples,
        "shards": [p.name for p in result.shards],
        "skipped": result.skipped,
        "first_problem": result.first_problem,
        "shuffle_seed": seed,
        "shard_size": args.shard_size,
        "resize": args.resize,
        "quality": args.quality,
        "alpha_background": list(options.background),
    }
    (out / f"{args.prefix}-conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    order = "stored order kept" if seed is None else f"shuffled with seed {seed}"
    print(result.summary(out) + f"; {order}")
    return 0


def cmd_from_csv(args: argparse.Namespace) -> int:
    old = _check_writer(args)
    from harmony.data.convert import csv_pairs

    cfg = DataConfig(csv_image_key=args.image_key, csv_caption_key=args.caption_key, csv_separator=args.separator)
    return _write(args, old, args.csv, csv_pairs(Path(args.csv), cfg))


def cmd_from_folder(args: argparse.Namespace) -> int:
    from harmony.data.convert import check_template, folder_pairs

    check_template(args.caption_template)
    old = _check_writer(args)
    return _write(args, old, args.folder, folder_pairs(Path(args.folder), args.caption_template))


def cmd_inspect(args: argparse.Namespace) -> int:
    check_counts(args, non_negative=("samples", "limit"))
    sheet = check_output_file(args.out) if args.out else None
    counts = check_output_file(args.json, "--json") if args.json else None
    from harmony.data.inspect import contact_sheet, in_order, report, scan, summary
    from harmony.data.sources import ShardSource, open_source
    from harmony.data.views import view_maker_for
    from harmony.models.tokenizer import CaptionTokenizer
    from harmony.presets import build_config

    csv_keys = {"csv_image_key": args.image_key, "csv_caption_key": args.caption_key, "csv_separator": args.separator}
    keys = [f"data.{key}={value}" for key, value in csv_keys.items() if value is not None]
    cfg = build_config(args.preset, [f"data_spec={args.spec}", *keys, *args.overrides])
    source = open_source(args.spec, cfg)
    if isinstance(source, ShardSource):
        print(f"{args.spec}: {len(source.urls)} shard(s), {source.epoch_size} samples with an image and a caption file")
    else:
        print(f"{args.spec}: {len(source)} samples")
    result = scan(in_order(source, cfg.data.max_image_pixels), args.limit, args.samples)
    print("\n".join(report(result, cfg.model.context_length)))
    if result.samples and sheet is not None:
        maker = view_maker_for(cfg)
        title = f"{args.spec} - image | global crops (darkened: masked patches) | local crops - {args.preset}"
        tokenizer = maker.tokenizer or CaptionTokenizer(cfg.model.context_length)
        contact_sheet(result.samples, maker, tokenizer, title, args.seed).save(sheet)
        print(f"contact sheet: {sheet} ({len(result.samples)} samples)")
    if counts is not None:
        record = {"spec": args.spec, "preset": args.preset, "limit": args.limit, "overrides": [*keys, *args.overrides]}
        counts.write_text(json.dumps({**record, **summary(result, cfg.model.context_length)}, indent=2) + "\n")
    if not result.usable:
        from harmony.data.errors import DataError

        raise DataError(f"{args.spec}: none of the {result.scanned} samples read is usable (see the problems above)")
    return 0


def _writer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for the .tar shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (> 0)")
    p.add_argument("--resize", type=int, default=0, help="shrink images whose shorter side is larger (0: keep)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (1-100) of re-encoded images")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (0: in this process)")
    p.add_argument("--prefix", default="shard", help="shard file names are PREFIX-00000.tar, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding (recorded in the JSON)")
    p.add_argument(
        "--keep-order", action="store_true", help="write in input order (sorted input gives one-class shards)"
    )
    p.add_argument(
        "--alpha-background",
        default="white",
        help="colour under transparent pixels of re-encoded images: white, black, gray, #rrggbb or r,g,b",
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards of the same prefix already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the built-in shapes dataset as WebDataset shards")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=10000, help="number of samples")
    p.add_argument("--split", choices=["train", "val"], default="train", help="which split (also the file prefix)")
    p.add_argument("--image-size", type=int, default=0, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--mismatch-rate", type=float, default=0.1, help="fraction of captions that describe another scene")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (> 0)")
    p.add_argument("--overwrite", action="store_true", help="replace shards of this split already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("from-csv", help="CSV/TSV of image paths and captions -> WebDataset shards")
    p.add_argument("csv", help="table with a header row; image paths relative to its folder")
    p.add_argument(
        "--image-key",
        "--csv-image-key",
        dest="image_key",
        default=DataConfig.csv_image_key,
        help="image path column (as data.csv_image_key)",
    )
    p.add_argument(
        "--caption-key",
        "--csv-caption-key",
        dest="caption_key",
        default=DataConfig.csv_caption_key,
        help="caption column (as data.csv_caption_key; open_clip exports often use 'title')",
    )
    p.add_argument("--separator", default="auto", help="auto (tab for .tsv), comma, tab or one character")
    _writer_arguments(p)
    p.set_defaults(func=cmd_from_csv)

    p = data.add_parser("from-folder", help="a folder of images with name.txt captions -> WebDataset shards")
    p.add_argument("folder", help="images anywhere below it; the caption of a.jpg is a.txt beside it")
    p.add_argument(
        "--caption-template",
        default="",
        help="caption for images without a .txt, {label} = parent folder name, e.g. 'a photo of a {label}.'",
    )
    _writer_arguments(p)
    p.set_defaults(func=cmd_from_folder)

    p = data.add_parser("inspect", help="counts, caption lengths and a contact sheet of what the model will see")
    p.add_argument("spec", help="data spec: shards, a .csv/.tsv, or builtin:shapes")
    p.add_argument("--preset", default="harmony-tiny", help="preset whose crops, masks and context are shown")
    p.add_argument("--out", default="inspect.png", help="contact sheet PNG ('' for none)")
    p.add_argument("--samples", type=int, default=8, help="samples on the contact sheet")
    p.add_argument("--limit", type=int, default=1000, help="samples scanned for the counts (0: all)")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed of the sheet")
    p.add_argument("--json", help="also write the counts here")
    p.add_argument(
        "--image-key", "--csv-image-key", dest="image_key", help="CSV image path column (data.csv_image_key)"
    )
    p.add_argument(
        "--caption-key", "--csv-caption-key", dest="caption_key", help="CSV caption column (data.csv_caption_key)"
    )
    p.add_argument("--separator", help="CSV separator: auto, comma, tab or one character (data.csv_separator)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.shuffle_buffer=0")
    p.set_defaults(func=cmd_inspect)
