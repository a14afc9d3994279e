"""`harmony repro` and `harmony demo`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def cmd_repro(args: argparse.Namespace) -> int:
    import json

    from harmony.outputs import check_output_dir
    from harmony.repro.report import plain_table
    from harmony.repro.runner import run_repro
    from harmony.repro.suite import load_suite

    suite = load_suite(args.suite)
    out = check_output_dir(args.out or Path("runs") / "repro" / suite.name)
    report = run_repro(suite, out, with_ablations=args.ablations, device=args.device)
    runs = json.loads((out / "results.json").read_text())
    print(plain_table(suite, runs))
    print(f"report: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Harmony vs CLIP on the built-in data: the short path through training, evaluation, report."""
    from harmony.train.logger import elapsed_text

    args.suite, args.ablations = "demo", False
    print("[demo] Harmony vs CLIP on builtin:shapes (tiny models, CPU); this takes a few minutes", flush=True)
    started = time.perf_counter()
    code = cmd_repro(args)
    print(f"[demo] done in {elapsed_text(time.perf_counter() - started)}", flush=True)
    return code


def add_repro_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repro", help="train and evaluate every method of a suite; write report.md")
    p.add_argument("--suite", required=True, help="built-in suite (shapes-tiny, shapes-small, demo) or a suite .yaml")
    p.add_argument("--out", help="output folder (default runs/repro/<suite>); an earlier one is resumed")
    p.add_argument("--ablations", action="store_true", help="also run the suite's Table 4 ablations")
    p.add_argument("--device", default="auto", help="evaluation device (training follows each preset's train.device)")
    p.set_defaults(func=cmd_repro)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="Harmony vs CLIP on the built-in data (minutes on a CPU)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); an earlier one is resumed")
    d.add_argument("--device", default="auto", help="evaluation device: auto, cpu or cuda")
    d.set_defaults(func=cmd_demo)
