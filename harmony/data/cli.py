"""`harmony data ...`: dataset tools (synth, from-csv, from-folder -> shards; inspect)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from harmony.config import BuiltinDataConfig, DataConfig
from harmony.presets import build_config

if TYPE_CHECKING:
    from harmony.data.convert import Pending


def cmd_synth(args: argparse.Namespace) -> int:
    from harmony.data.shapes import ShapesDataset
    from harmony.data.shards import write_shapes

    defaults = BuiltinDataConfig()
    dataset = ShapesDataset(args.split, args.num, args.image_size or defaults.image_size, args.seed, args.mismatch_rate)
    shards = write_shapes(dataset, Path(args.out), args.shard_size, progress=not args.no_progress)
    print(f"wrote {len(dataset)} {args.split} samples to {len(shards)} shard(s) in {args.out}")
    return 0


def _write(args: argparse.Namespace, pairs: list[Pending]) -> int:
    from harmony.data.convert import EncodeOptions, write_shards

    options = EncodeOptions(args.resize, args.quality, DataConfig().max_image_pixels)
    out = Path(args.out)
    result = write_shards(pairs, out, args.shard_size, options, args.workers, args.prefix, not args.no_progress)
    print(result.summary(out))
    return 0


def cmd_from_csv(args: argparse.Namespace) -> int:
    from harmony.data.convert import csv_pairs

    cfg = DataConfig(csv_image_key=args.image_key, csv_caption_key=args.caption_key, csv_separator=args.separator)
    return _write(args, csv_pairs(Path(args.csv), cfg))


def cmd_from_folder(args: argparse.Namespace) -> int:
    from harmony.data.convert import folder_pairs

    return _write(args, folder_pairs(Path(args.folder), args.caption_template))


def cmd_inspect(args: argparse.Namespace) -> int:
    from harmony.data.inspect import contact_sheet, in_order, report, scan
    from harmony.data.sources import ShardSource, open_source
    from harmony.data.views import view_maker_for
    from harmony.models.tokenizer import CaptionTokenizer

    cfg = build_config(args.preset, [f"data_spec={args.spec}", *args.overrides])
    source = open_source(args.spec, cfg)
    if isinstance(source, ShardSource):
        print(f"{args.spec}: {len(source.urls)} shard(s), {source.epoch_size} captioned samples")
    else:
        print(f"{args.spec}: {len(source)} samples")
    tokenizer = CaptionTokenizer(cfg.model.context_length)
    result = scan(in_order(source, cfg.data.max_image_pixels), args.limit, args.samples, tokenizer)
    print("\n".join(report(result, cfg.model.context_length)))
    if result.samples and args.out:
        maker = view_maker_for(cfg)
        title = f"{args.spec} - image | global crops (darkened: masked patches) | local crops - {args.preset}"
        contact_sheet(result.samples, maker, maker.tokenizer or tokenizer, title, args.seed).save(args.out)
        print(f"contact sheet: {args.out} ({len(result.samples)} samples)")
    if args.json:
        summary = {"scanned": result.scanned, "usable": result.usable, "skipped": result.skipped, "words": result.words}
        Path(args.json).write_text(json.dumps(summary) + "\n")
    return 0


def _writer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for the .tar shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--resize", type=int, default=0, help="shrink images whose shorter side is larger (0: keep)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (0: in this process)")
    p.add_argument("--prefix", default="shard", help="shard file names are PREFIX-00000.tar, ...")
    p.add_argument("--no-progress", action="store_true")


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the built-in shapes dataset as WebDataset shards")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=10000, help="number of samples")
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.add_argument("--image-size", type=int, default=0, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mismatch-rate", type=float, default=0.1, help="fraction of captions that describe another scene")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("from-csv", help="CSV/TSV of image paths and captions -> WebDataset shards")
    p.add_argument("csv", help="table with a header row; image paths relative to its folder")
    p.add_argument("--image-key", default="filepath", help="image path column")
    p.add_argument("--caption-key", default="caption", help="caption column (open_clip exports often use 'title')")
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
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.csv_caption_key=title"
    )
    p.set_defaults(func=cmd_inspect)
