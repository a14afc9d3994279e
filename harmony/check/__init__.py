"""`harmony check gpu`: one command that checks the CUDA path and fills the performance table.

Parts (each in its own process with its own time limit, under one overall deadline, 8 minutes by
default): `env` (versions, GPU, peak TFLOP/s), `cuda-tests` (the CUDA-path checks listed in the
package, `harmony.check.device_checks`), `bench` (CLIP and Harmony training steps: time, memory,
TFLOP/s, MFU), `data` (the loader's images/s), `train` (a short real run: loss terms finite and
falling, data-wait share). Writes `report.md` and `report.json` with each part ok / failed / skipped
and the acceptance targets met / not met, and exits 1 unless every part is ok (130 after Ctrl-C, with
the report of what ran). `--device cpu` is the rehearsal at tiny sizes (run by the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence

from harmony.check.plan import PARTS, plan_for
from harmony.check.report import markdown, targets
from harmony.check.runner import INTERRUPTED, Part, run_parts
from harmony.core.errors import ConfigError, run_reported
from harmony.outputs import check_output_dir

DEFAULT_DEADLINE_S = 480.0


def cmd_check_gpu(args: argparse.Namespace) -> int:
    out = check_output_dir(args.out).resolve()
    plan = plan_for(args.device)
    wanted = ["env", *(p for p in args.parts.split(",") if p and p != "env")] if args.parts else list(PARTS)
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise ConfigError(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    plan_file = work / "plan.json"
    plan_file.write_text(plan.to_json() + "\n")
    parts = [
        Part(
            name,
            [
                *(sys.executable, "-m", "harmony.check.parts", name),
                *("--plan", str(plan_file), "--out", "{out}", "--work", str(work / name), "--seconds", "{seconds}"),
            ],
            plan.budgets[name],
        )
        for name in PARTS
        if name in wanted
    ]
    results = run_parts(parts, args.deadline, work, progress=not args.quiet)
    command = shlex.join(
        ["harmony", "check", "gpu", "--device", args.device, "--out", str(out), "--deadline", f"{args.deadline:g}"]
        + (["--parts", args.parts] if args.parts else [])
    )
    report = markdown(plan, results, command)
    (out / "report.md").write_text(report + "\n")
    summary = {
        "command": command,
        "plan": dataclasses.asdict(plan),
        "parts": [dataclasses.asdict(r) for r in results],
        "targets": [
            {**dataclasses.asdict(t), "verdict": t.verdict} for t in targets(plan, {r.name: r for r in results})
        ],
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(report)
    print(f"\nreport: {out / 'report.md'} and {out / 'report.json'}")
    if any(r.error == INTERRUPTED for r in results):
        return 130
    return 0 if all(r.status == "ok" for r in results) else 1


def _add_gpu_parser(what: argparse._SubParsersAction) -> None:
    p = what.add_parser(
        "gpu", help="CUDA tests, benchmark, loader and a short run in one report", description=__doc__.split("\n\n")[1]
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the rehearsal at tiny sizes")
    p.add_argument("--out", default="runs/check-gpu", help="folder for report.md, report.json and the parts' logs")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, help="overall limit in seconds")
    p.add_argument("--parts", default="", help=f"comma-separated subset of {','.join(PARTS)} (env always runs)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_check_gpu)


def add_check_parser(sub: argparse._SubParsersAction) -> None:
    """`harmony check gpu ...` (registered by the main CLI)."""
    p = sub.add_parser("check", help="check the CUDA path and measure performance in one run (`check gpu`)")
    _add_gpu_parser(p.add_subparsers(dest="check_target", required=True))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m harmony.check gpu ...` (the same command without the main CLI)."""
    parser = argparse.ArgumentParser(prog="python -m harmony.check")
    _add_gpu_parser(parser.add_subparsers(dest="check_target", required=True))
    args = parser.parse_args(argv)
    return run_reported(lambda: int(args.func(args)))
