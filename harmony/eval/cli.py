"""`harmony eval <task>`: downstream evaluation of a checkpoint; JSON to --out, a table to stdout."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harmony.eval.report import format_table, write_result


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from harmony.eval.zeroshot import read_lines, run_zeroshot
    from harmony.loading import load

    device = _device(args.device)
    pretrained = load(args.checkpoint, weights=args.weights, device=device)
    result = run_zeroshot(
        pretrained,
        args.data,
        device,
        class_names=read_lines(args.classnames) if args.classnames else None,
        templates=read_lines(args.templates) if args.templates else None,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    write_result(Path(args.out) if args.out else None, result)
    m = result["metrics"]
    rows = [
        ("top1", m["top1"]),
        ("top5", m["top5"]),
        ("chance", m["chance"]),
        ("images", result["dataset"]["num_images"]),
    ]
    print(format_table(rows, f"zero-shot on {args.data} ({pretrained.weights} weights, step {pretrained.step})"))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--data", default="builtin:shapes:val", help="evaluation data spec")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--weights", choices=["auto", "student", "teacher"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    tasks = sub.add_parser("eval", help="evaluate a checkpoint downstream").add_subparsers(
        dest="eval_task", required=True
    )
    p = tasks.add_parser("zeroshot", help="zero-shot classification with prompt templates")
    _common(p)
    p.add_argument("--classnames", help="file with one class name per line (default: the dataset's)")
    p.add_argument("--templates", help="file with one prompt template per line, '{}' for the class name")
    p.set_defaults(func=cmd_zeroshot)
