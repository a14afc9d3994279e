"""`harmony repro`: train every method of a suite with the same data and budget, evaluate each
checkpoint with the evaluation suite, and write the comparison report.

Everything is resumable: a method whose training finished (a `finished.json` marker matching the
suite's training settings) is not trained again, a partly trained one continues with
`--resume auto`, and an evaluation whose JSON exists for the same checkpoint file (size, modification time), protocol,
data and settings is reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from harmony.core.device import resolve_device
from harmony.core.errors import ReproError
from harmony.repro.suite import Suite


def _train_command(suite: Suite, preset: str, run_dir: Path, fresh: bool) -> list[str]:
    """Continue the method's run (`--resume auto`), or start it over when it ran with other settings."""
    return [
        sys.executable,
        "-m",
        "harmony.cli",
        "train",
        "--preset",
        suite.preset_of(preset),
        "--data",
        suite.train.data,
        "--out",
        str(run_dir),
        *(["--overwrite"] if fresh else ["--resume", "auto"]),
        "--no-progress",
        *suite.overrides_for(preset),
    ]


def _progress_line(line: str, preset: str) -> bool:
    """The trainer's per-log-step line ('<preset> step 40/500 loss ... elapsed ...')."""
    return line.startswith(f"{preset} step ")


def _progress_of(line: str, suite: Suite, run: str) -> str:
    """A progress line named by the suite's run (`dino@resnet-tiny step ...`), not only by its preset."""
    return run + line.rstrip()[len(suite.preset_of(run)) :]


def train_method(suite: Suite, preset: str, run_dir: Path, echo: bool = True) -> dict[str, Any]:
    """Train one method unless a matching finished run exists; returns the finished marker. The
    training output goes to `train.log`, and its progress lines (one per log step) to the console."""
    marker = run_dir / "finished.json"
    wanted = {"preset": preset, "data": suite.train.data, "overrides": suite.overrides_for(preset)}
    fresh = False
    if marker.exists():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in wanted} == wanted:
            return dict(done)
        fresh = True  # trained with other settings: continuing it would mix the two
        marker.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    if echo:
        again = " (settings changed since it was trained: starting over)" if fresh else ""
        print(f"[repro] training {preset} -> {run_dir}{again}", flush=True)
    started = time.perf_counter()
    last = ""
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.Popen(
            _train_command(suite, preset, run_dir, fresh),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                last = line.strip() or last
                if echo and _progress_line(line, suite.preset_of(preset)):
                    print(f"[repro] {_progress_of(line, suite, preset)}", flush=True)
        except KeyboardInterrupt:
            # the trainer got the same Ctrl-C and is saving its checkpoint: let it finish (a second
            # Ctrl-C aborts both), so that the next `harmony repro` continues from there
            log.writelines(proc.stdout)
            proc.wait()
            raise
        returncode = proc.wait()
    if returncode != 0:
        raise ReproError(f"training {preset} failed (exit {returncode}): {last[-300:]}; see {run_dir / 'train.log'}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    done = {**wanted, "steps": records[-1]["step"] if records else 0, "train_time_s": time.perf_counter() - started}
    marker.write_text(json.dumps(done, indent=2) + "\n")
    return done


def evaluate_method(
    suite: Suite, preset: str, run_dir: Path, eval_dir: Path, cache: Path, device: torch.device, echo: bool = True
) -> dict[str, Any]:
    """Every task of the suite on one checkpoint; results cached per task and checkpoint file."""
    from harmony.eval.report import write_result
    from harmony.eval.suite import PROTOCOLS, run_task
    from harmony.loading import load

    pretrained = load(run_dir / "checkpoints" / "last.pt", weights=suite.eval.weights, device=device)
    identity = pretrained.file_identity  # a retrained method is evaluated again
    results: dict[str, Any] = {}
    for task in suite.eval.tasks:
        spec = suite.eval.task(task)
        protocol, data, settings = spec.protocol, spec.data, spec.settings
        path = eval_dir / f"{task}.json"
        requested = {
            "protocol": protocol,
            "data": data,
            **({"train": spec.train} if spec.train else {}),
            "settings": settings,
            "weights": pretrained.weights,
            "checkpoint": identity,
        }
        if path.exists():
            cached = json.loads(path.read_text())
            if cached.get("requested") == requested:
                results[task] = cached
                continue
        if PROTOCOLS[protocol].needs_text and not pretrained.model.has_text:
            result: dict[str, Any] = {"task": task, "skipped": "no text tower", "step": pretrained.step}
        else:
            if echo:
                print(f"[repro] {preset}: {task}", flush=True)
            result = run_task(
                protocol,
                pretrained,
                data,
                device,
                train_spec=spec.train or None,
                cache_dir=cache,
                maps_dir=eval_dir / "maps",
                num_workers=suite.eval.workers,
                **settings,
            )
        result["requested"] = requested
        write_result(path, result)
        results[task] = result
    return results


def run_repro(suite: Suite, out: Path, with_ablations: bool = False, device: str = "auto", echo: bool = True) -> Path:
    """Train, evaluate and report every method of `suite` under `out`; returns the report path."""
    from harmony.repro.report import write_report

    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(asdict(suite), indent=2) + "\n")
    runs: dict[str, dict[str, Any]] = {}
    for preset in suite.presets(with_ablations):
        run_dir = out / "runs" / preset
        finished = train_method(suite, preset, run_dir, echo)
        evals = evaluate_method(suite, preset, run_dir, out / "evals" / preset, out / "cache", dev, echo)
        runs[preset] = {"train": finished, "evals": evals, "run_dir": str(run_dir)}
    (out / "results.json").write_text(json.dumps(runs, indent=2, default=str) + "\n")
    return write_report(suite, out, runs)
