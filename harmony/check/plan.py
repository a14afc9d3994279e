"""What `harmony check gpu` runs and how long each part may take: the GPU plan (ViT-S/16 and ViT-B/16
at the paper's shapes, 8 minutes on one H100/H200) and the CPU rehearsal (tiny-test, a few steps)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARTS = ("env", "cuda-tests", "bench", "data", "train")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Plan:
    device: str
    small: str  # the model size of the loader, training and largest-batch runs (ViT-S/16)
    large: str  # the second size of the performance table (ViT-B/16)
    test_size: str  # the model size of the CUDA-path checks (`harmony.check.device_checks`)
    test_methods: str  # comma-separated methods for the bf16 check ("" = every method)
    test_checks: tuple[str, ...]  # the checks to run by name (() = every check)
    check_seconds: float  # the time limit of one check (a hung one is stopped, the next ones still run)
    bench_batch: int
    bench_max_batches: tuple[int, ...]  # tried largest first for the small size; the first that fits is kept
    bench_steps: int
    bench_warmup: int
    bench_compile: bool
    workers: int  # loader workers of the data part and the training run
    data_batches: int
    data_batch: int
    data_jpegs: int  # photo-like JPEGs (~500x400 px) written for the per-path loader profile
    train_steps: int
    train_batch: int
    train_log_every: int
    train_overrides: tuple[str, ...]
    budgets: dict[str, float] = field(default_factory=dict)  # seconds per part

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> Plan:
        data: dict[str, Any] = json.loads(path.read_text())
        for key in ("test_checks", "bench_max_batches", "train_overrides"):
            data[key] = tuple(data[key])
        return cls(**data)


# Seconds per part on the GPU: 8 minutes in all. A part may also use what earlier parts left unused,
# as long as the parts after it keep their own budgets (see runner.run_parts).
GPU_BUDGETS = {"env": 30.0, "cuda-tests": 145.0, "bench": 180.0, "data": 55.0, "train": 70.0}


def gpu_plan() -> Plan:
    cores = usable_cores()
    return Plan(
        device="cuda",
        small="vit-s16",
        large="vit-b16",
        test_size="tiny",
        test_methods="",
        test_checks=(),
        check_seconds=100.0,  # compiling takes the longest
        bench_batch=32,
        bench_max_batches=(128, 96, 64),
        bench_steps=10,
        bench_warmup=3,
        bench_compile=True,
        workers=max(1, cores - 2),  # the training process and the main loader thread keep a core each
        data_batches=20,
        data_batch=64,
        data_jpegs=256,
        train_steps=300,
        train_batch=64,
        train_log_every=10,
        train_overrides=("optim.warmup_epochs=0.5",),
        budgets=dict(GPU_BUDGETS),
    )


def cpu_plan() -> Plan:
    """The rehearsal: every part of the GPU plan end to end at tiny sizes, for the test suite."""
    return Plan(
        device="cpu",
        small="tiny-test",
        large="tiny-test",
        test_size="tiny-test",
        test_methods="clip,harmony",
        # two of the checks prove the part end to end; the test suite runs every check on the CPU (tests/test_cuda.py)
        test_checks=("fused_adamw_matches_plain_adamw", "non_finite_step_is_skipped_on_the_device"),
        check_seconds=60.0,
        bench_batch=2,
        bench_max_batches=(),  # the largest-batch search is tested with stand-in runs (tests/test_gpu_check.py)
        bench_steps=1,
        bench_warmup=1,
        bench_compile=False,
        workers=0,
        data_batches=2,
        data_batch=8,
        data_jpegs=8,
        train_steps=16,
        train_batch=8,
        train_log_every=2,
        train_overrides=("optim.lr=0.01", "optim.warmup_epochs=0.2"),
        budgets={"env": 60.0, "cuda-tests": 240.0, "bench": 180.0, "data": 60.0, "train": 120.0},
    )


def plan_for(device: str) -> Plan:
    return gpu_plan() if device == "cuda" else cpu_plan()
