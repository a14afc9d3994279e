"""`harmony repro` and `harmony demo`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harmony.repro.suite import Suite


def suite_of(args: argparse.Namespace) -> Suite:
    """The suite named on the command line, its variables set, its budget adjusted by the flags."""
    from harmony.repro.suite import adjusted, load_suite, parse_assignments

    suite = load_suite(args.suite, parse_assignments(args.set or [], "--set"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    return adjusted(suite, args.size, methods, args.train_set, args.eval_set, args.workers)


def cmd_dry_run(suite: Suite, args: argparse.Namespace) -> int:
    """Check every path and format the suite reads and print the compute estimate; nothing trains."""
    from harmony.repro.compute import accelerator, compute_table, estimate
    from harmony.repro.dryrun import check_suite_data

    gpu = accelerator(args.gpu, args.mfu, args.peak_tflops)
    started = time.perf_counter()
    presets = suite.presets(args.ablations)
    print(f"[dry-run] suite {suite.name}: {len(presets)} method(s) at size {suite.size}", flush=True)
    found = check_suite_data(suite)
    for line in found.lines:
        print(f"[dry-run] {line}", flush=True)
    print(f"[dry-run] data checked in {time.perf_counter() - started:.1f} s", flush=True)
    if found.problems:
        for problem in found.problems:
            print(f"harmony repro --dry-run: {problem}", file=sys.stderr)
        print(f"[dry-run] {len(found.problems)} problem(s); nothing was trained", flush=True)
        return 1
    print(compute_table([estimate(suite, p, found.train_samples) for p in presets], gpu), flush=True)
    print(f"[dry-run] ok in {time.perf_counter() - started:.1f} s; nothing was trained", flush=True)
    return 0


def cmd_repro(args: argparse.Namespace) -> int:
    import json

    from harmony.outputs import check_output_dir
    from harmony.repro.report import plain_tables
    from harmony.repro.runner import run_repro

    suite = suite_of(args)
    if args.dry_run:
        return cmd_dry_run(suite, args)
    out = check_output_dir(args.out or Path("runs") / "repro" / suite.name)
    report = run_repro(suite, out, with_ablations=args.ablations, device=args.device)
    runs = json.loads((out / "results.json").read_text())
    print(plain_tables(suite, runs))
    print(f"report: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Harmony vs CLIP on the built-in data: the short path through training, evaluation, report."""
    from harmony.train.logger import elapsed_text

    args.suite, args.ablations, args.dry_run = "demo", False, False
    args.set = args.size = args.methods = args.train_set = args.eval_set = args.workers = None
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
    p.add_argument(
        "--set", nargs="+", action="extend", metavar="NAME=VALUE", help="the suite's variables (data paths, counts)"
    )
    p.add_argument("--dry-run", action="store_true", help="check every path and format, print the compute estimate")
    budget = p.add_argument_group("a smaller budget (a quick check of the whole suite)")
    budget.add_argument("--size", help="every method at this size instead of the suite's (e.g. tiny-test)")
    budget.add_argument("--methods", metavar="A,B", help="only these of the suite's methods")
    budget.add_argument(
        "--train-set", nargs="+", action="extend", metavar="KEY=VALUE", help="training settings for every method"
    )
    budget.add_argument(
        "--eval-set", nargs="+", action="extend", metavar="TASK.KEY=VALUE", help="a task's protocol settings"
    )
    budget.add_argument("--workers", type=int, help="evaluation loader workers instead of the suite's")
    cost = p.add_argument_group("compute estimate (--dry-run)")
    cost.add_argument("--gpu", default="H100", help="GPU named in the estimate: H100, H200, A100 [H100]")
    cost.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation assumed [0.4]")
    cost.add_argument("--peak-tflops", type=float, help="dense bf16 peak of a GPU not in the list")
    p.set_defaults(func=cmd_repro)


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="Harmony vs CLIP on the built-in data (minutes on a CPU)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); an earlier one is resumed")
    d.add_argument("--device", default="auto", help="evaluation device: auto, cpu or cuda")
    d.set_defaults(func=cmd_demo)
