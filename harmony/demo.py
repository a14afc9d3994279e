"""`harmony demo`: the short path on the built-in data (CLIP pre-training, then zero-shot)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harmony.config import build_config


def cmd_demo(args: argparse.Namespace) -> int:
    from harmony.eval.report import format_table, write_result
    from harmony.eval.zeroshot import run_zeroshot
    from harmony.loading import load
    from harmony.train.loop import train

    out = Path(args.out)
    cfg = build_config("clip-tiny", [f"train.epochs={args.epochs}"])
    print(f"[demo] pre-training {cfg.name} on builtin:shapes for {args.epochs} epochs -> {out / 'clip-tiny'}")
    result = train(cfg, out / "clip-tiny")
    pretrained = load(result.checkpoint)
    zs = run_zeroshot(pretrained, "builtin:shapes:val", torch.device("cpu"))
    write_result(out / "clip-tiny" / "zeroshot.json", zs)
    m = zs["metrics"]
    print(
        format_table(
            [("top1", m["top1"]), ("top5", m["top5"]), ("chance", m["chance"])],
            "[demo] zero-shot on builtin:shapes:val",
        )
    )
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pre-train on the built-in data and evaluate (a few minutes on a CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=float, default=4.0)
    p.set_defaults(func=cmd_demo)
