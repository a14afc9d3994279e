"""`harmony data ...`: dataset tools."""

from __future__ import annotations

import argparse
from pathlib import Path

from harmony.config import BuiltinDataConfig


def cmd_synth(args: argparse.Namespace) -> int:
    from harmony.data.shapes import ShapesDataset
    from harmony.data.shards import write_shapes

    defaults = BuiltinDataConfig()
    dataset = ShapesDataset(args.split, args.num, args.image_size or defaults.image_size, args.seed, args.mismatch_rate)
    shards = write_shapes(dataset, Path(args.out), args.shard_size, progress=not args.no_progress)
    print(f"wrote {len(dataset)} {args.split} samples to {len(shards)} shard(s) in {args.out}")
    return 0


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
