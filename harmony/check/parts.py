"""The parts of `harmony check gpu`, each run in its own process by `harmony.check.runner`:

    python -m harmony.check.parts NAME --plan plan.json --out part.json --work DIR --seconds S

A part writes its figures to `--out` as it goes (so a part killed at its time limit keeps what it
measured) and exits non-zero with the reason when its check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmony.check.plan import Plan, usable_cores

if TYPE_CHECKING:
    import torch

Record = Callable[[dict[str, Any]], None]


class PartFailed(RuntimeError):
    """The part ran and found something wrong; the message is the report's error line."""


def _device(plan: Plan) -> torch.device:
    """The plan's device; cuda on a machine without it fails the part with the one message for it."""
    from harmony.core.device import resolve_device
    from harmony.core.errors import ConfigError

    try:
        return resolve_device(plan.device)
    except ConfigError as exc:
        raise PartFailed(str(exc)) from None


def part_env(plan: Plan, work: Path, seconds: float, record: Record) -> None:
    """Versions, device, the peak TFLOP/s used for MFU, CPU cores."""
    import torch

    from harmony.core.checkpoint import git_revision

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git": git_revision(),
        "cpu_cores": usable_cores(),
        "device": plan.device,
    }
    device = _device(plan)
    if device.type == "cuda":
        from harmony.train.bench import peak_tflops

        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            peak_tflops=peak_tflops(device),
            driver=_driver_version(),
        )
    record(info)


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):  # a hung or broken nvidia-smi costs the driver line only
        return None
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None


def part_cuda_tests(plan: Plan, work: Path, seconds: float, record: Record) -> None:
    """The CUDA-path checks of `harmony.check.device_checks` (the plan's subset, or every one) on the plan's
    device, each in a worker process under a time limit; one row per check."""
    from harmony.check.device_checks import device_checks, run_checks, worker_command

    if plan.device != "cpu":  # (this process need not load torch for the CPU: the workers do)
        _device(plan)
    methods = [m for m in plan.test_methods.split(",") if m]
    names = [c.name for c in device_checks(plan.device, methods)]
    unknown = sorted(set(plan.test_checks) - set(names))
    if unknown:
        raise PartFailed(f"the plan names checks that do not exist: {', '.join(unknown)}")
    names = [n for n in names if not plan.test_checks or n in plan.test_checks]
    worker = worker_command(plan.device, plan.test_size, methods, work)
    rows = run_checks(names, worker, seconds - 5, plan.check_seconds, work, lambda rows: record({"tests": rows}))
    record({"tests": rows})
    failed = [r["name"] for r in rows if r["outcome"] == "failed"]
    if failed:
        raise PartFailed(f"{len(failed)} of {len(rows)} cuda checks failed: {', '.join(failed)}")
    skipped = [r["name"] for r in rows if r["outcome"] != "passed"]
    if skipped:
        raise PartFailed(f"{len(skipped)} of {len(rows)} cuda checks did not run (out of time): {', '.join(skipped)}")


def bench_runs(plan: Plan, compiled: bool) -> list[tuple[str, str, int, bool]]:
    """(method, size, batch, compiled) at the table's batch, small size first."""
    sizes = dict.fromkeys([plan.small, plan.large])
    if compiled:  # the large size first: its MFU target allows compiling
        sizes = dict.fromkeys([plan.large, plan.small])
    return [(method, size, plan.bench_batch, compiled) for size in sizes for method in ("clip", "harmony")]


def _bench_one(plan: Plan, preset: str, batch: int, compiled: bool, seconds: float) -> dict[str, Any]:
    """One `harmony bench` measurement in a fresh process (its own peak memory, a crash stays there)."""
    cmd = [sys.executable, "-m", "harmony.train.bench", "--worker", preset, "--device", plan.device]
    warmup = plan.bench_warmup + (2 if compiled else 0)  # compiling happens in the first steps
    cmd += ["--batch-size", str(batch), "--steps", str(plan.bench_steps), "--warmup", str(warmup)]
    cmd += ["train.compile=true"] if compiled else []
    row: dict[str, Any] = {"preset": preset, "batch_size": batch, "compiled": compiled}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(seconds, 1), check=False)
    except subprocess.TimeoutExpired:  # the part's time ran out: not a failure of the step
        return {**row, "error": f"skipped: out of time after {seconds:.0f} s", "skipped": True}
    if proc.returncode != 0:
        oom = "out of memory" in proc.stderr.lower()
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        return {**row, "error": "out of memory" if oom else tail[0][:300], "oom": oom}
    return {**row, **json.loads(proc.stdout.strip().splitlines()[-1]), "compiled": compiled}


def part_bench(plan: Plan, work: Path, seconds: float, record: Record) -> None:
    """The performance table: CLIP and Harmony per size, batch and mode, then the largest batch that fits."""
    deadline = time.monotonic() + seconds - 5
    rows: list[dict[str, Any]] = []

    def measure(method: str, size: str, batch: int, compiled: bool) -> dict[str, Any] | None:
        left = deadline - time.monotonic()
        if left < 10:
            row = {"preset": f"{method}-{size}", "batch_size": batch, "compiled": compiled, "skipped": True}
            rows.append({**row, "error": "skipped: out of time"})
            return None
        row = _bench_one(plan, f"{method}-{size}", batch, compiled, left)
        rows.append(row)
        record({"runs": rows})
        return row

    # what the targets need first: eager at batch 32, the largest batch, then compiled (slow to start)
    for run in bench_runs(plan, compiled=False):
        measure(*run)
    for batch in plan.bench_max_batches:
        row = measure("harmony", plan.small, batch, False)
        if row is None or not row.get("oom"):
            if row is not None and "error" not in row:
                measure("clip", plan.small, batch, False)
            break
    for run in bench_runs(plan, compiled=True) if plan.bench_compile else []:
        row = measure(*run)
        if row is not None:
            use_eager_flops(row, rows)
    record({"runs": rows})
    failed = [r for r in rows if "error" in r and not r.get("oom") and not r.get("skipped")]
    errors = [f"{r['preset']} b{r['batch_size']}: {r['error']}" for r in failed]
    if errors:
        raise PartFailed("; ".join(errors))


def use_eager_flops(compiled: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """A compiled step does the same arithmetic as the eager one; if the FLOPs counted through the
    compiled module differ, the eager count is used for TFLOP/s and MFU and the other is kept aside."""
    eager = next(
        (
            r
            for r in rows
            if "error" not in r
            and not r["compiled"]
            and (r["preset"], r["batch_size"]) == (compiled["preset"], compiled["batch_size"])
        ),
        None,
    )
    if eager is None or "error" in compiled or eager["flops_per_step"] == compiled["flops_per_step"]:
        return
    scale = eager["flops_per_step"] / compiled["flops_per_step"]
    compiled["flops_counted_when_compiled"] = compiled["flops_per_step"]
    compiled["flops_per_step"] = eager["flops_per_step"]
    compiled["achieved_tflops"] *= scale
    if "mfu" in compiled:
        compiled["mfu"] *= scale


def write_photo_jpegs(folder: Path, count: int) -> Path:
    """`count` photo-like JPEGs (gradient, shapes, noise; 450-550 x 350-450 px, every fifth portrait) and
    a CSV naming them: the device path decodes JPEGs only, so the built-in PNG-like data cannot time it."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["filepath,caption"]
    for i in range(count):
        w, h = int(rng.integers(450, 551)), int(rng.integers(350, 451))
        if i % 5 == 4:
            w, h = h, w
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 128, 3)
        pixels = np.broadcast_to(ramp, (h, w, 3)) + rng.normal(0, 6, (h, w, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 11))):
            x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x, y, x + int(rng.integers(10, w // 2)), y + int(rng.integers(10, h // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour)
        image.save(folder / f"{i:05d}.jpg", quality=90)
        rows.append(f"{i:05d}.jpg,a photo number {i}")
    csv = folder / "data.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def part_data(plan: Plan, work: Path, seconds: float, record: Record) -> None:
    """`harmony bench data` at the small size's shapes with the training run's worker count, then the CPU
    ms/image of one loader worker on both paths (pixels vs `data.device_augment`) and the device's
    decode + crop rate, on photo-like JPEGs, for CLIP and Harmony."""
    from harmony.data.throughput import device_rate, measure_loader, profile_stages

    row = measure_loader(
        f"harmony-{plan.small}", "builtin:shapes", plan.workers, plan.data_batches, plan.data_batch, []
    )
    data: dict[str, Any] = {"loader": row, "cpu_cores": usable_cores(), "paths": []}
    record(data)
    csv = write_photo_jpegs(work / "jpegs", plan.data_jpegs)
    for method in ("clip", "harmony"):
        preset = f"{method}-{plan.small}"
        device_ms, batch = profile_stages(preset, str(csv), plan.data_jpegs, [], device_augment=True)
        worker_ms, _ = profile_stages(preset, str(csv), plan.data_jpegs, [], device_augment=False)
        rate = device_rate(preset, batch, [], plan.device)
        data["paths"].append(
            {
                "preset": preset,
                "images": plan.data_jpegs,
                "worker_path_ms_per_image": sum(worker_ms.values()),
                "device_augment_ms_per_image": sum(device_ms.values()),
                "device_images_per_s": rate,
                "stages": {"worker": worker_ms, "device_augment": device_ms},
            }
        )
        record(data)


def part_train(plan: Plan, work: Path, seconds: float, record: Record) -> None:
    """A short real training run: every loss term finite and falling, and the data-wait share."""
    from harmony.presets import build_config
    from harmony.train.loop import train

    preset = f"harmony-{plan.small}"
    overrides = [
        f"train.device={plan.device}",
        f"train.max_steps={plan.train_steps}",
        f"train.batch_size={plan.train_batch}",
        f"train.log_every={plan.train_log_every}",
        f"data.num_workers={plan.workers}",
        "train.save_every=1000000",
        *plan.train_overrides,
    ]
    out = work / "train-run"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not the continuation of an earlier check's
    start = time.monotonic()
    result = train(build_config(preset, overrides), out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = summarise_training(records)
    record({"preset": preset, "overrides": overrides, "seconds": time.monotonic() - start, **summary})
    if result.steps != plan.train_steps:
        raise PartFailed(f"the run stopped at step {result.steps} of {plan.train_steps}")
    bad = [t for t, v in summary["terms"].items() if not v["finite"] or v["falling"] is False]
    if bad:
        raise PartFailed("loss terms not finite and falling: " + ", ".join(bad))


def _kl(record: dict[str, Any], term: str) -> float | None:
    """A self-distillation cross-entropy minus its targets' entropy: the student's KL from the teacher.
    The cross-entropy itself may rise while the student learns, as the targets soften (docs/tuning.md)."""
    if term == "loss_text_distill" and "text_distill_target_entropy" in record:
        return float(record[term]) - float(record["text_distill_target_entropy"])
    if term == "loss_ibot" and "ibot_cls_target_entropy" in record:
        cls = float(record["ibot_cls"]) - float(record["ibot_cls_target_entropy"])
        if "ibot_patch_target_entropy" not in record:
            return cls
        return 0.5 * cls + 0.5 * (float(record["ibot_patch"]) - float(record["ibot_patch_target_entropy"]))
    return None


def summarise_training(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per loss term: mean of the first and last quarter of the log records, finite everywhere, falling
    (self-distillation terms: their KL part falls); throughput and data-wait share without the first
    record (it holds the loader's start-up). The weighted total is shown, not judged."""
    quarter = max(1, len(records) // 4)

    def trend(values: list[float]) -> tuple[float, float]:
        return sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter

    terms: dict[str, dict[str, Any]] = {}
    for name in sorted(k for k in records[0] if k == "loss" or k.startswith("loss_")):
        values = [float(r[name]) for r in records]
        first, last = trend(values)
        finite = all(math.isfinite(v) for v in values)
        row: dict[str, Any] = {"first": first, "last": last, "finite": finite, "judged_on": name}
        kls = [_kl(r, name) for r in records]
        if all(k is not None for k in kls):
            row["kl_first"], row["kl_last"] = trend([k for k in kls if k is not None])
            row["judged_on"] = "KL (loss - target entropy)"
            first, last = row["kl_first"], row["kl_last"]
        row["falling"] = None if name == "loss" else finite and last < first
        terms[name] = row
    steady = records[1:] or records
    step_time = sum(r["step_time_s"] for r in steady)
    return {
        "steps": int(records[-1]["step"]),
        "terms": terms,
        "images_per_s": sum(r["images_per_s"] for r in steady) / len(steady),
        "step_time_s": step_time / len(steady),
        "data_wait_share": sum(r["data_time_s"] for r in steady) / step_time if step_time > 0 else None,
        "bad_steps": int(records[-1].get("bad_steps", 0)),
    }


PART_FUNCTIONS: dict[str, Callable[[Plan, Path, float, Record], None]] = {
    "env": part_env,
    "cuda-tests": part_cuda_tests,
    "bench": part_bench,
    "data": part_data,
    "train": part_train,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmony.check.parts")
    parser.add_argument("name", choices=sorted(PART_FUNCTIONS))
    parser.add_argument("--plan", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--seconds", required=True, type=float)
    args = parser.parse_args(argv)
    data: dict[str, Any] = {}

    def record(update: dict[str, Any]) -> None:
        data.update(update)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps({"data": data}, indent=2, default=str) + "\n")
        os.replace(tmp, args.out)

    args.work.mkdir(parents=True, exist_ok=True)
    try:
        PART_FUNCTIONS[args.name](Plan.from_file(args.plan), args.work, args.seconds, record)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = message if isinstance(exc, PartFailed) else f"{type(exc).__name__}: {message}"
        args.out.write_text(json.dumps({"data": data, "error": error[:1000]}, indent=2, default=str) + "\n")
        raise
    record({})
    return 0


if __name__ == "__main__":
    sys.exit(main())
