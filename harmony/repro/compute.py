"""What a suite costs before it runs: FLOPs per training step from `harmony bench`'s FLOP model, times the
steps each method trains, as total FLOPs and GPU-hours at a stated model-FLOPs utilisation on a named GPU.

A step's FLOPs are counted on a real step of the method (its suite settings, on this machine's CPU) at two
samples per step and scaled to the suite's batch: every term of a step grows with the batch but the
contrastive logits (batch x batch x 512, under 0.01 % at batch 768). Captions are counted at the full context
(77 tokens), an upper bound: runs cut each batch after its longest caption.
"""

from __future__ import annotations

from dataclasses import dataclass

from harmony.core.errors import ConfigError
from harmony.presets import build_config
from harmony.repro.suite import Suite
from harmony.train.bench import PEAK_TFLOPS

COUNTED_BATCH = 2  # samples of the counted step: the fewest every objective takes (BatchNorm heads need two)


@dataclass(frozen=True)
class Accelerator:
    """A GPU's dense bf16 peak and the share of it a run achieves (model-FLOPs utilisation)."""

    name: str
    peak_tflops: float
    mfu: float

    def describe(self) -> str:
        return f"{self.name} at {self.peak_tflops:g} TFLOP/s dense bf16, {100 * self.mfu:g} % MFU"


def accelerator(name: str, mfu: float, peak_tflops: float | None = None) -> Accelerator:
    """A GPU by name (`harmony bench`'s table) or with its peak given; a bad MFU or unknown GPU is a ConfigError."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: give the achieved share of the peak, in (0, 1]")
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ConfigError(f"--peak-tflops {peak_tflops}: give the GPU's dense bf16 peak, a positive number")
        return Accelerator(name, peak_tflops, mfu)
    known = {k.lower(): (k, v) for k, v in PEAK_TFLOPS.items()}
    if name.lower() not in known:
        raise ConfigError(f"--gpu {name}: known GPUs are {', '.join(PEAK_TFLOPS)}; give another's with --peak-tflops")
    label, peak = known[name.lower()]
    return Accelerator(label, peak, mfu)


@dataclass(frozen=True)
class Estimate:
    preset: str
    flops_per_step: float
    batch_size: int
    samples: int  # 0 when unknown (remote shards without data.epoch_size)
    steps: int

    @property
    def total_flops(self) -> float:
        return self.flops_per_step * self.steps

    def gpu_hours(self, gpu: Accelerator) -> float:
        return self.total_flops / (gpu.peak_tflops * 1e12 * gpu.mfu) / 3600


def step_flops(preset: str, overrides: list[str]) -> float:
    """FLOPs (forward + backward) of one optimiser step of `preset` with `overrides`, at their batch size."""
    import torch

    from harmony.core.distributed import DistInfo
    from harmony.train.bench import components, make_batch
    from harmony.train.flops import ComponentFlops
    from harmony.train.step import Stepper

    cfg = build_config(preset, overrides)
    counted = build_config(
        preset,
        [
            *overrides,
            f"train.batch_size={COUNTED_BATCH}",
            "train.accum_steps=1",
            "train.device=cpu",
            "data.caption_padding=context",
        ],
    )
    stepper = Stepper(counted, torch.device("cpu"), DistInfo())
    stepper.set_span(steps_per_epoch=1000, total_steps=100000)
    batch = make_batch(counted, stepper.task, stepper.tokenizer, COUNTED_BATCH)
    with ComponentFlops(components(stepper.task)) as counter:
        stepper.train_step(batch)
    return counter.total() / COUNTED_BATCH * cfg.train.batch_size


def estimate(suite: Suite, preset: str, counted_samples: int) -> Estimate:
    """One method's run: its FLOPs per step and its steps (from data.epoch_size, else the counted samples)."""
    from harmony.train.loop import total_steps_of

    overrides = suite.overrides_for(preset)
    cfg = build_config(suite.preset_of(preset), overrides)
    if suite.train.data.startswith("builtin:"):
        samples = cfg.data.builtin.num_train
    else:
        samples = cfg.data.epoch_size or counted_samples
    per_epoch = samples // cfg.train.batch_size
    steps = total_steps_of(cfg, per_epoch) if per_epoch or cfg.train.max_steps else 0
    return Estimate(preset, step_flops(suite.preset_of(preset), overrides), cfg.train.batch_size, samples, steps)


def compute_table(estimates: list[Estimate], gpu: Accelerator) -> str:
    """The estimate per method, with its FLOPs per step as a ratio to CLIP's where CLIP is in the suite."""
    clip = next((e.flops_per_step for e in estimates if e.preset.startswith("clip-")), None)
    width = max(len(e.preset) for e in estimates) + 2
    head = f"{'method':<{width}}{'TFLOP/step':>11}{'x CLIP':>8}{'batch':>7}{'samples':>12}{'steps':>9}"
    head += f"{'total EFLOP':>13}{'GPU-hours':>11}"
    lines = [f"compute estimate: {gpu.describe()}", head, "-" * len(head)]
    for e in estimates:
        ratio = f"{e.flops_per_step / clip:.2f}" if clip else "-"
        samples = f"{e.samples:,}" if e.samples else "unknown"
        hours = f"{e.gpu_hours(gpu):,.1f}" if e.steps else "-"
        lines.append(
            f"{e.preset:<{width}}{e.flops_per_step / 1e12:>11.2f}{ratio:>8}{e.batch_size:>7}{samples:>12}"
            f"{e.steps:>9,}{e.total_flops / 1e18:>13.3f}{hours:>11}"
        )
    total = sum(e.gpu_hours(gpu) for e in estimates if e.steps)
    lines.append(f"all methods: {total:,.1f} GPU-hours")
    return "\n".join(lines)
