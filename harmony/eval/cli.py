"""`harmony eval <task>`: downstream evaluation of a checkpoint; JSON to --out, a table to stdout.

Each task's budget knobs are flags generated from its settings dataclass (defaults sized for the
built-in data on a CPU, paper-sized for real datasets). `harmony eval all` runs the whole suite for
one or more checkpoints and writes one markdown report with plots.

Every command needs `--data` (no command picks a dataset for the user: `builtin:shapes:val` is the
built-in demo set), and output paths are checked before any checkpoint is loaded. Unreadable images
are skipped, counted in the JSON (`dataset.skipped`) and reported in one stderr line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harmony.core.colors import parse_background
from harmony.core.errors import ConfigError
from harmony.eval.report import report_skips, result_table, write_result
from harmony.eval.settings import add_flags, overrides_from, parse_value
from harmony.eval.suite import PROTOCOLS, run_label, run_suite, run_task
from harmony.outputs import check_output_dir, check_output_file


def _background(text: str) -> tuple[int, int, int]:
    try:
        return parse_background(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of workers (0 or more)")
    return int(text)


def cmd_task(args: argparse.Namespace) -> int:
    from harmony.core.device import resolve_device
    from harmony.loading import load

    protocol = PROTOCOLS[args.eval_task]
    out = check_output_file(args.out) if args.out else None
    maps = Path(args.maps) if getattr(args, "maps", None) else (out.with_suffix("") if out else None)
    if args.eval_task == "attention":
        maps = check_output_dir(maps or Path("attention_maps"), "--maps" if getattr(args, "maps", None) else "--out")
    device = resolve_device(args.device)
    pretrained = load(args.checkpoint, weights=args.weights, device=device)
    extra: dict[str, Any] = {}
    for name in ("image_root", "train_image_root"):
        if getattr(args, name, None):
            extra[name] = Path(getattr(args, name))
    result = run_task(
        args.eval_task,
        pretrained,
        args.data,
        device,
        train_spec=getattr(args, "train", None),
        cache_dir=Path(args.cache_dir) if getattr(args, "cache_dir", None) else None,
        maps_dir=maps,
        num_workers=args.workers,
        background=args.alpha_background,
        **extra,
        **overrides_from(args, protocol.defaults),
    )
    write_result(out, result)
    print(result_table(result))
    report_skips(result)
    if out is not None:
        print(f"result: {out}")
    if "files" in result:
        print(f"maps: {', '.join(result['files'])}")
    return 0


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """`task.key=value` strings -> {task: {key: typed value}} (types from the task's settings)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        task, dot, name = key.partition(".")
        if not (sep and dot) or task not in PROTOCOLS or not hasattr(PROTOCOLS[task].defaults, name):
            raise ConfigError(f"--set '{item}' is not <task>.<setting>=<value> for a known task and setting")
        try:
            out.setdefault(task, {})[name] = parse_value(getattr(PROTOCOLS[task].defaults, name), text)
        except ConfigError as exc:
            raise ConfigError(f"--set '{item}': {exc}") from None
    return out


def parse_data_for(items: list[str]) -> dict[str, str]:
    """`task=spec` strings -> {task: spec}; a missing '=' or spec is an error, not a silent default."""
    out: dict[str, str] = {}
    for item in items:
        task, sep, spec = item.partition("=")
        if not sep or not spec.strip() or task not in PROTOCOLS:
            raise ConfigError(f"--data-for '{item}' is not <task>=<data spec> for a known task ({','.join(PROTOCOLS)})")
        out[task] = spec.strip()
    return out


def cmd_all(args: argparse.Namespace) -> int:
    from harmony.core.device import resolve_device
    from harmony.eval.summary import headline_rows, markdown_table, write_report
    from harmony.loading import load

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(PROTOCOLS)
    unknown = [t for t in tasks if t not in PROTOCOLS]
    if unknown or not tasks:
        raise ConfigError(f"--tasks names unknown task(s) {unknown or 'none'}; known: {','.join(PROTOCOLS)}")
    settings = parse_sets(args.set)
    data_for = parse_data_for(args.data_for)
    out = check_output_dir(args.out)
    device = resolve_device(args.device)
    runs, taken = {}, set[str]()
    for checkpoint in args.checkpoint:
        label = run_label(Path(checkpoint), taken)
        pretrained = load(checkpoint, weights=args.weights, device=device)
        print(f"== {label}: {pretrained.config.name}, step {pretrained.step}, {pretrained.weights} weights", flush=True)
        runs[label] = run_suite(
            pretrained,
            device,
            out / label,
            args.data,
            tasks,
            args.train,
            settings,
            Path(args.cache_dir) if args.cache_dir else None,
            args.workers,
            data_for=data_for,
            background=args.alpha_background,
        )
    report = write_report(runs, out)
    print(markdown_table(["metric", *runs], [[name, *values] for name, values in headline_rows(runs)]))
    print(f"report: {report}")
    return 0


def _common(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument(
        "--weights",
        choices=["auto", "student", "teacher"],
        default="auto",
        help="which weights of the checkpoint (auto: the teacher when it is complete, else the student)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--workers", type=_workers, default=2, help="data loader worker processes (0: in this process)")
    p.add_argument(
        "--alpha-background",
        type=_background,
        default="white",
        metavar="COLOUR",
        help="colour transparent images are composited over: white, black, gray, #rrggbb or r,g,b [white]",
    )


DATA_HELP = {
    "zeroshot": "class folder (one sub-folder per class), or builtin:shapes:val",
    "retrieval": ".csv/.tsv, COCO/Karpathy .json, WebDataset shards, or builtin:shapes:val",
    "knn": "class folder of the evaluation split (its train/ sibling is the training split), or builtin:shapes:val",
    "linear": "class folder of the evaluation split (its train/ sibling is the training split), or builtin:shapes:val",
    "finetune": "class folder of the evaluation split (its train/ sibling is the training split), or builtin:shapes:val",
    "segment": "ADE20K-style images/<split> folder, or builtin:shapes:val",
    "detect": "COCO instances .json, or builtin:shapes:val",
    "attention": "class folder (images drawn from it), or builtin:shapes:val (also scored)",
}


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    tasks = sub.add_parser("eval", help="evaluate a checkpoint downstream").add_subparsers(
        dest="eval_task", required=True
    )
    for name, protocol in PROTOCOLS.items():
        p = tasks.add_parser(name, help=protocol.help, description=protocol.help)
        p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
        p.add_argument("--out", help="write the result JSON here (checked before any work)")
        _common(p, f"evaluation data (required): {DATA_HELP[name]}")
        if protocol.trains:
            p.add_argument("--train", help="training split spec (default: derived from --data)")
        if protocol.caches:
            p.add_argument("--cache-dir", help="feature cache folder (default: $HARMONY_CACHE or ~/.cache/harmony)")
        if name in ("retrieval", "detect"):
            p.add_argument("--image-root", help="image folder for a .json dataset (default: guessed from its path)")
        if name == "detect":
            p.add_argument("--train-image-root", help="image folder for the training .json")
        if name == "attention":
            p.add_argument("--maps", help="folder for the PNGs (default: --out without .json, else ./attention_maps)")
        add_flags(p, protocol.defaults, protocol.full)
        p.set_defaults(func=cmd_task)
    p = tasks.add_parser("all", help="run every protocol and write one markdown report with plots")
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint (repeat to compare several)")
    p.add_argument("--out", default="runs/eval", help="report folder (one sub-folder of JSONs per checkpoint)")
    _common(p, "data for every task (required; builtin:shapes:val for the demo set); --data-for overrides per task")
    p.add_argument("--train", help="training split spec (default: derived from --data)")
    p.add_argument("--cache-dir", help="feature cache folder")
    p.add_argument("--tasks", help=f"comma-separated subset of {','.join(PROTOCOLS)}")
    p.add_argument("--set", action="append", default=[], metavar="TASK.KEY=VALUE", help="a protocol setting")
    p.add_argument("--data-for", action="append", default=[], metavar="TASK=SPEC", help="another data spec for a task")
    p.set_defaults(func=cmd_all)
