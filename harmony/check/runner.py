"""Run the parts of the check one after another, each in its own process group with its own time
limit, under one overall deadline: a hang or a crash (a CUDA fault kills a process) in one part ends
that part only, the others still run and report, and parts that no longer fit are "skipped"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A part is not started with less than this left: it could not finish anything useful.
MIN_START_S = 5.0
# A stopped part gets this long between SIGTERM and SIGKILL.
GRACE_S = 5.0
INTERRUPTED = "interrupted (Ctrl-C)"


@dataclass
class Part:
    name: str
    command: list[str]  # run as is; `{out}` and `{seconds}` in an argument are filled in
    budget: float  # seconds


@dataclass
class PartResult:
    name: str
    status: str  # "ok", "failed" or "skipped"
    seconds: float = 0.0
    error: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the part's whole process group (its workers and subprocesses too), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=GRACE_S)
            if sig == signal.SIGTERM:
                os.killpg(proc.pid, signal.SIGKILL)  # what the leader left behind
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def tail(path: Path, lines: int = 1) -> str:
    if not path.is_file():
        return ""
    text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])[:500]


def run_part(part: Part, seconds: float, work: Path) -> PartResult:
    """Run one part for at most `seconds`; its figures come from the JSON file it writes."""
    out, log = work / f"{part.name}.json", work / f"{part.name}.log"
    out.unlink(missing_ok=True)
    command = [a.replace("{out}", str(out)).replace("{seconds}", f"{seconds:.0f}") for a in part.command]
    start = time.monotonic()
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=stderr, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            code = None
            stop_group(proc)
        except BaseException:  # Ctrl-C: take the part's processes down too
            stop_group(proc)
            raise
        else:
            stop_group(proc)  # a part's leftover children (loader workers) end with it
    elapsed = time.monotonic() - start
    written: dict[str, Any] = {}
    if out.is_file():
        try:
            written = json.loads(out.read_text())
        except json.JSONDecodeError:
            written = {"error": f"unreadable result file {out}"}
    data = written.get("data", {})
    if code is None:
        return PartResult(part.name, "failed", elapsed, f"timed out after {seconds:.0f} s (log: {log})", data)
    if code != 0:
        reason = written.get("error") or tail(log) or f"exit status {code}"
        if code < 0:
            reason = f"killed by signal {-code}; {reason}"
        return PartResult(part.name, "failed", elapsed, f"{reason} (log: {log})", data)
    return PartResult(part.name, "ok", elapsed, "", data)


def run_parts(parts: list[Part], deadline_s: float, work: Path, progress: bool = True) -> list[PartResult]:
    """Every part in order. A part may run for its budget, or longer when earlier parts left time over
    (never into the budgets of the parts after it), and never past the overall deadline."""
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: list[PartResult] = []
    for i, part in enumerate(parts):
        left = deadline_s - (time.monotonic() - start)
        reserved = sum(p.budget for p in parts[i + 1 :])
        seconds = min(left, max(part.budget, left - reserved))
        if seconds < MIN_START_S:
            results.append(PartResult(part.name, "skipped", 0.0, "skipped: out of time"))
            continue
        if progress:
            print(f"[check] {part.name}: up to {seconds:.0f} s", file=sys.stderr, flush=True)
        part_start = time.monotonic()
        try:
            result = run_part(part, seconds, work)
        except KeyboardInterrupt:  # report what ran; the rest did not
            results.append(PartResult(part.name, "failed", time.monotonic() - part_start, INTERRUPTED))
            results += [PartResult(p.name, "skipped", 0.0, "skipped: interrupted") for p in parts[i + 1 :]]
            return results
        if progress:
            line = f"[check] {part.name}: {result.status} in {result.seconds:.0f} s"
            print(line + (f" ({result.error})" if result.error else ""), file=sys.stderr, flush=True)
        results.append(result)
    return results
