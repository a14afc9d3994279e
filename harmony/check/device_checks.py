"""The CUDA-path checks of `harmony check gpu` (its `cuda-tests` part), listed once, in the package.

Each check runs a probe of `harmony.check.probes` on a model size and a device: a bf16 step of every
method against fp32, fp16 with the loss scaler, gradient accumulation (harmony, siglip, mocov3), fused
AdamW, fused attention in both towers, `train.compile`, a non-finite step skipped, and resume + export.
`tests/test_cuda.py` is the pytest view of this list (on the GPU, or on the CPU at the tiny-test size);
the part runs it through `run_checks`, in worker processes, so that a hung check or a CUDA fault ends
that check only:

    python -m harmony.check.device_checks --device cuda --size tiny --work DIR --results F.jsonl --names a,b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from harmony.check.runner import stop_group, tail

ACCUMULATION_METHODS = ("harmony", "siglip", "mocov3")
# A worker is not started for the remaining checks with less than this left.
MIN_CHECK_S = 5.0
POLL_S = 0.2


@dataclass(frozen=True)
class DeviceCheck:
    name: str
    run: Callable[[str, str, Path], object]  # (model size, device, scratch folder) -> the probe's figures


def _low(device: str) -> str:
    """The precision of the checks that are not about precision: bf16 on a GPU, fp32 on a CPU."""
    return "bf16" if device == "cuda" else "fp32"


def _bf16(method: str, size: str, device: str, folder: Path) -> object:
    from harmony.check import probes

    return probes.precision_matches_fp32(f"{method}-{size}", device, "bf16")


def _fp16(size: str, device: str, folder: Path) -> object:
    from harmony.check import probes

    return probes.precision_matches_fp32(f"harmony-{size}", device, "fp16")


def _accumulation(method: str, size: str, device: str, folder: Path) -> object:
    from harmony.check import probes

    return probes.accumulation_matches_whole_batch(f"{method}-{size}", device, _low(device))


def _fused_adamw(size: str, device: str, folder: Path) -> object:
    from harmony.check import probes

    return probes.fused_adamw_matches_reference(f"harmony-{size}", device)


def _attention(size: str, device: str, folder: Path) -> object:
    from harmony.check import probes

    found = probes.attention_kernels(f"harmony-{size}", device, _low(device))
    if set(found) != {"vision", "text"}:
        raise probes.ProbeFailed(f"harmony-{size}: attention was checked in {sorted(found)}, not both towers")
    return found


def _compile(method: str, size: str, device: str, folder: Path) -> object:
    """Found on the CPU: compiling renamed the student's parameters (`_orig_mod.`), and the EMA teacher
    pairing raised KeyError 'visual.mask_token' for every method with a teacher."""
    from harmony.check import probes

    return probes.compile_matches_eager(f"{method}-{size}", device, steps=2)


def _non_finite(size: str, device: str, folder: Path) -> object:
    from harmony.check import probes

    return probes.nonfinite_step_is_skipped(f"harmony-{size}", device)


def _resume(size: str, device: str, folder: Path) -> object:
    """Found on the CPU: each new loader iterator drew its workers' seed from the global RNG, so a resumed
    run drew other drop-path masks (loss 21.59 vs 21.94 at step 3 of harmony-tiny-test)."""
    from harmony.check import probes

    return probes.resume_and_export(f"harmony-{size}", device, folder)


def device_checks(device: str, methods: Sequence[str] = ()) -> list[DeviceCheck]:
    """Every check in the order the part runs them; `methods` limits the bf16 check (default: every method)."""
    from harmony.presets import method_names

    # the GPU compiles Harmony's three student graphs (masked, global and local crops); the CPU, where
    # compiling costs minutes, MoCo v3's one (an EMA teacher too: the pairing of parameter names still shows)
    compiled = "harmony" if device == "cuda" else "mocov3"
    return [
        *(DeviceCheck(f"bf16_step_matches_fp32[{m}]", partial(_bf16, m)) for m in methods or method_names()),
        DeviceCheck("fp16_with_the_loss_scaler_matches_fp32", _fp16),
        *(
            DeviceCheck(f"gradient_accumulation_matches_the_whole_batch[{m}]", partial(_accumulation, m))
            for m in ACCUMULATION_METHODS
        ),
        DeviceCheck("fused_adamw_matches_plain_adamw", _fused_adamw),
        DeviceCheck("both_towers_use_fused_attention", _attention),
        DeviceCheck(f"compiled_student_trains_like_eager[{compiled}]", partial(_compile, compiled)),
        DeviceCheck("non_finite_step_is_skipped_on_the_device", _non_finite),
        DeviceCheck("resume_is_exact_and_the_checkpoint_exports", _resume),
    ]


def worker_command(device: str, size: str, methods: Sequence[str], work: Path) -> list[str]:
    """The worker that runs checks of this list; `run_checks` adds `--results` and `--names`."""
    command = [sys.executable, "-m", "harmony.check.device_checks", "--device", device, "--size", size]
    return [*command, "--methods", ",".join(methods), "--work", str(work)]


def _events(path: Path) -> list[dict[str, Any]]:
    """The worker's complete lines so far (a line being written is read at the next poll)."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def _row(name: str, outcome: str, message: str, seconds: float = 0.0, figures: object = None) -> dict[str, Any]:
    row = {"name": name, "outcome": outcome, "message": message, "seconds": round(seconds, 2)}
    return {**row, "figures": figures} if figures is not None else row


def run_checks(
    names: Sequence[str],
    worker: Sequence[str],
    seconds: float,
    check_seconds: float,
    work: Path,
    progress: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
) -> list[dict[str, Any]]:
    """One row per named check (passed / failed / skipped, its error line, seconds), in `seconds` at most.

    The checks run in order in a worker process (`worker` + `--results F --names a,b,...`). A check
    that runs past `check_seconds` or the part's time, or whose worker dies (a CUDA fault, a crash),
    is failed and its worker's process group stopped; a new worker takes the checks after it. Checks
    that no longer fit are skipped. `progress` gets the rows after each check."""
    deadline = time.monotonic() + seconds
    rows: list[dict[str, Any]] = []
    pending = list(names)
    log, results = work / "device-checks.log", work / "device-checks.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    while pending:
        if deadline - time.monotonic() < MIN_CHECK_S:
            rows += [_row(name, "skipped", "skipped: out of time") for name in pending]
            break
        results.unlink(missing_ok=True)
        command = [*worker, "--results", str(results), "--names", ",".join(pending)]
        with open(log, "ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        running: str | None = None  # the check the worker has started and not finished
        since, seen, stopped = time.monotonic(), 0, ""  # since: the worker's start or its last event
        try:
            while True:
                code = proc.poll()
                events = _events(results)
                for event in events[seen:]:
                    since = time.monotonic()
                    if "start" in event:
                        running = event["start"]
                        continue
                    running = None
                    pending.remove(event["name"])
                    rows.append(_row(*(event[k] for k in ("name", "outcome", "message", "seconds", "figures"))))
                    progress(rows)
                seen = len(events)
                if code is not None:
                    break
                if time.monotonic() > deadline:
                    stopped = "stopped: the part's time ran out"
                    break
                if time.monotonic() - since > check_seconds:
                    stopped = f"timed out after {check_seconds:.0f} s"
                    if running is None:  # stuck before it began the next check (e.g. starting up)
                        running, stopped = pending[0], f"{stopped}, before it started"
                    break
                time.sleep(POLL_S)
        finally:
            stop_group(proc)  # the worker's own children (loader workers, compile workers) too
        if running is not None:
            reason = stopped or f"the worker died ({_exit(proc.returncode)}): {tail(log) or 'no output'}"
            pending.remove(running)
            rows.append(_row(running, "failed", reason, time.monotonic() - since))
            progress(rows)
        elif pending:  # the worker ended, or the part's time did, between two checks
            if stopped:
                rows += [_row(name, "skipped", "skipped: out of time") for name in pending]
            else:
                why = f"not run: the worker ended ({_exit(proc.returncode)}): {tail(log) or 'no output'}"
                rows += [_row(name, "failed", why) for name in pending]
            progress(rows)
            break
    return rows


def _exit(code: int | None) -> str:
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"


def _write(path: Path, event: dict[str, Any]) -> None:
    with open(path, "a") as out:
        out.write(json.dumps(event, default=str) + "\n")
        out.flush()
        os.fsync(out.fileno())


def main(argv: list[str] | None = None) -> int:
    """The worker: run the named checks in order, a line to `--results` as each starts and ends."""
    parser = argparse.ArgumentParser(prog="python -m harmony.check.device_checks")
    parser.add_argument("--device", required=True)
    parser.add_argument("--size", required=True)
    parser.add_argument("--methods", default="", help="comma-separated methods of the bf16 check (default: all)")
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--results", required=True, type=Path)
    parser.add_argument("--names", required=True, help="comma-separated check names, run in this order")
    args = parser.parse_args(argv)
    checks = {c.name: c for c in device_checks(args.device, [m for m in args.methods.split(",") if m])}
    for name in args.names.split(","):
        _write(args.results, {"start": name})
        print(f"[check] {name}: started", flush=True)  # the log's last line, should the process die
        started = time.monotonic()
        try:
            figures, outcome, message = checks[name].run(args.size, args.device, args.work / name), "passed", ""
        except Exception as exc:  # each check's failure is its row; the traceback goes to the log
            traceback.print_exc()
            text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
            figures, outcome = None, "failed"
            message = text if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {text}"
        took = time.monotonic() - started
        _write(
            args.results, {"name": name, "outcome": outcome, "message": message, "seconds": took, "figures": figures}
        )
        print(f"[check] {name}: {outcome} in {took:.1f} s {message}".rstrip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
