"""The `harmony` command: train, presets, data tools, evaluation, demo.

Every user mistake (bad config, bad data, bad checkpoint) ends in one line on stderr and a non-zero
exit: 2 for configuration and usage errors, 1 for data, checkpoint and training errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from harmony.config import ConfigError, dump_yaml
from harmony.presets import build_config, describe, method_names, size_names


def _train_overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "train.epochs": args.epochs,
        "train.max_steps": args.max_steps,
        "train.batch_size": args.batch_size,
        "train.device": args.device,
        "train.seed": args.seed,
        "train.precision": args.precision,
        "data.num_workers": args.workers,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.data is not None:
        overrides.append(f"data_spec={args.data}")
    return overrides + list(args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = _train_overrides(args)
    cfg = build_config(args.preset, overrides)
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    from harmony.train.loop import train

    out = Path(args.out) if args.out else Path("runs") / cfg.name
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if result.is_main:
        print(result.summary())
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    print("methods (combine as {method}-{size}, e.g. harmony-tiny):")
    for name in method_names():
        print(f"  {name:<20} {describe('methods', name)}")
    print("sizes:")
    for name in size_names():
        print(f"  {name:<20} {describe('sizes', name)}")
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="pre-train a model", description="Pre-train with a preset and key=value overrides."
    )
    p.add_argument("--preset", required=True, help="{method}-{size} (see `harmony presets`) or a YAML config file")
    p.add_argument(
        "--data", help="builtin:shapes, a .csv/.tsv file, a shard folder, a brace pattern of .tar shards, or a URL spec"
    )
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int, help="run length in steps (schedules span it); overrides --epochs")
    p.add_argument("--batch-size", type=int, help="global batch size (split over processes)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--workers", type=int, help="data loader workers per process")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in --out) or a checkpoint path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")
    p.set_defaults(func=cmd_train)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`harmony bench [--preset ...]` (one training step) and `harmony bench data ...` (the loader)."""
    from harmony.train.bench import add_bench_step_arguments, cmd_bench_step

    p = sub.add_parser("bench", help="measure FLOPs, step time, memory (or `bench data`: loader images/s)")
    add_bench_step_arguments(p)
    p.set_defaults(func=cmd_bench_step)
    what = p.add_subparsers(dest="bench_target")
    data = what.add_parser("data", help="images/s of the full training data loader per worker count")

    def cmd_bench_data(args: argparse.Namespace) -> int:
        from harmony.data.throughput import cmd_bench_data as run

        return run(args)

    from harmony.data.throughput import add_bench_data_arguments

    add_bench_data_arguments(data)
    data.set_defaults(func=cmd_bench_data)


def build_parser() -> argparse.ArgumentParser:
    from harmony.data.cli import add_data_parser
    from harmony.eval.cli import add_eval_parser
    from harmony.export import add_export_parser
    from harmony.repro.cli import add_repro_parsers

    parser = argparse.ArgumentParser(
        prog="harmony", description="Pre-train and evaluate vision encoders from image-caption pairs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    p = sub.add_parser("presets", help="list methods and sizes")
    p.set_defaults(func=cmd_presets)
    add_data_parser(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)
    add_export_parser(sub)
    add_repro_parsers(sub)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"harmony: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    from harmony.data.sources import DataError
    from harmony.outputs import OutputError
    from harmony.repro.runner import ReproError
    from harmony.train.checkpoint import CheckpointError
    from harmony.train.step import TrainingError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # key=value overrides may sit anywhere among the options (argparse stops collecting a
    # positional list at the first option that follows it)
    if extras:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extras):
            args.overrides = [*args.overrides, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except (DataError, CheckpointError, TrainingError, ReproError, OutputError) as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        # the reader went away (`harmony presets | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
