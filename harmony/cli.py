"""The `harmony` command: train, presets, data tools, evaluation, benchmarks, export, reproduction.

Each command's parser lives in its own module and is imported only when that command runs (a static
table below names them), so `harmony --help` and `harmony presets` answer without loading torch.
Every user mistake (bad config, bad data, bad checkpoint, unwritable output) ends in one line on
stderr and a non-zero exit: 2 for configuration and usage errors, 1 for the others (the table is in
`harmony.core.errors`); any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from harmony.core.errors import run_reported

# name -> (one-line help, "module:function" that adds the command's parser to the subparsers)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("pre-train a model", "harmony.cli:add_train_command"),
    "presets": ("list methods and sizes", "harmony.cli:add_presets_parser"),
    "data": ("dataset tools: synth, from-csv, from-folder, inspect", "harmony.data.cli:add_data_parser"),
    "eval": ("evaluate checkpoints (zero-shot, retrieval, k-NN, linear, ...)", "harmony.eval.cli:add_eval_parser"),
    "bench": (
        "measure FLOPs, step time, memory (or `bench data`: loader images/s)",
        "harmony.cli:add_bench_parser",
    ),
    "export": ("export encoders for timm, open_clip or transformers", "harmony.export.cli:add_export_parser"),
    "repro": ("train and evaluate every method of a suite; write report.md", "harmony.repro.cli:add_repro_parser"),
    "demo": ("Harmony vs CLIP on the built-in data (minutes on a CPU)", "harmony.repro.cli:add_demo_parser"),
    "check": ("check the machine (e.g. `harmony check gpu`)", "harmony.check:add_check_parser"),
}


def cmd_presets(args: argparse.Namespace) -> int:
    from harmony.presets import describe, method_names, size_names

    print("methods (combine as {method}-{size}, e.g. harmony-tiny):")
    for name in method_names():
        print(f"  {name:<20} {describe('methods', name)}")
    print("sizes:")
    for name in size_names():
        print(f"  {name:<20} {describe('sizes', name)}")
    return 0


def evaluation_during_training(*args: Any) -> Any:
    """`harmony.eval.during.DuringTraining`, imported when a run evaluates (the trainer sits below `eval`)."""
    from harmony.eval.during import DuringTraining

    return DuringTraining(*args)


def add_train_command(sub: argparse._SubParsersAction) -> None:
    """`harmony train`, with the evaluation during training its runs build when the config asks for it."""
    from harmony.train.cli import add_train_parser

    add_train_parser(sub)
    sub.choices["train"].set_defaults(evaluation=evaluation_during_training)


def add_presets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help=COMMANDS["presets"][0])
    p.set_defaults(func=cmd_presets)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`harmony bench [--preset ...]` (one training step) and `harmony bench data ...` (the loader)."""
    from harmony.data.throughput import add_bench_data_arguments, cmd_bench_data
    from harmony.train.bench import add_bench_step_arguments, cmd_bench_step

    p = sub.add_parser("bench", help=COMMANDS["bench"][0])
    add_bench_step_arguments(p)
    p.set_defaults(func=cmd_bench_step)
    what = p.add_subparsers(dest="bench_target")
    data = what.add_parser("data", help="images/s of the full training data loader per worker count")
    add_bench_data_arguments(data)
    data.set_defaults(func=cmd_bench_data)


def _adder(name: str) -> Callable[[argparse._SubParsersAction], None]:
    module, function = COMMANDS[name][1].split(":")
    adder: Callable[[argparse._SubParsersAction], None] = getattr(importlib.import_module(module), function)
    return adder


def _command_of(argv: Sequence[str]) -> str | None:
    """The first argument that is not an option: the command, if it is one of ours."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def _hold_bench_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without its key=value overrides, the overrides) for `harmony bench`, whose optional `data`
    subcommand would otherwise be handed the first override that follows an option and refuse it. A word
    right after an option is that option's value (every `bench` option takes one: `--json a=b.json`)."""
    words = [a for a in argv if not a.startswith("-")]
    if words[1:2] == ["data"]:
        return argv, []
    is_value = [False, *(a.startswith("-") and "=" not in a for a in argv[:-1])]
    held = [i for i, a in enumerate(argv) if OVERRIDE.match(a) and not is_value[i]]
    return [a for i, a in enumerate(argv) if i not in held], [argv[i] for i in held]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser of `command`; every other command is a placeholder carrying its help line."""
    parser = argparse.ArgumentParser(
        prog="harmony", description="Pre-train and evaluate vision encoders from image-caption pairs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_line, _) in COMMANDS.items():
        if name == command:
            _adder(name)(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = _command_of(argv)
    parser = build_parser(command)
    argv, held = _hold_bench_overrides(argv) if command == "bench" else (argv, [])
    args, extras = parser.parse_known_args(argv)
    extras = [*extras, *held]
    # key=value overrides may sit anywhere among the options (argparse stops collecting a
    # positional list at the first option that follows it)
    if extras:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extras):
            args.overrides = [*args.overrides, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return run_reported(lambda: int(args.func(args) or 0))


if __name__ == "__main__":
    sys.exit(main())
