"""`harmony bench`: the cost of one full training step, per preset, as ratios to CLIP of the same size.

For each preset, in a fresh subprocess (so peak memory is that preset's alone): build the task and
optimiser, make one real batch through the data views, count FLOPs of forward + backward with
torch's FLOP formulas (broken down by component, see `harmony.train.flops`), list the forward passes, then time steps after a
warm-up. Every preset is compared with `clip-<size>` measured in the same run, and with itself under each
`--variant` (settings such as `model.freeze=image`: what they save, as ratios).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harmony.config import Config, ConfigError
from harmony.core.device import resolve_device
from harmony.core.distributed import DistInfo
from harmony.core.errors import run_reported
from harmony.models.cnn import CNNTower
from harmony.models.tokenizer import CaptionTokenizer
from harmony.presets import build_config, split_preset
from harmony.train.flops import ComponentFlops
from harmony.train.freeze import check_towers
from harmony.train.memory import SavedActivations
from harmony.train.step import Stepper
from harmony.train.task import PretrainTask

# Dense bf16 peak TFLOP/s by device name, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def components(task: PretrainTask) -> dict[str, list[torch.nn.Module]]:
    """The parts a step's FLOPs are reported by."""
    kind = "CNN" if isinstance(task.student.visual, CNNTower) else "ViT"
    out: dict[str, list[torch.nn.Module]] = {f"student {kind}": [task.student.visual]}
    if task.teacher is not None:
        out[f"teacher {kind}"] = [task.teacher.visual]
    if task.student.text is not None:
        out["text student"] = [task.student.text]
    if task.teacher is not None and task.teacher.text is not None:
        out["text teacher"] = [task.teacher.text]
    heads: list[torch.nn.Module] = []
    for objective in task.objectives.values():
        for label, modules in objective.flop_parts().items():  # type: ignore[operator]
            if label == "heads":
                heads.extend(modules)
            else:
                out.setdefault(label, []).extend(modules)
    if heads:
        out["heads"] = heads
    return out


def make_batch(
    cfg: Config, task: PretrainTask, tokenizer: CaptionTokenizer | None, batch_size: int
) -> dict[str, torch.Tensor]:
    """One real batch through the data views (built-in images), as the loader would produce it."""
    from harmony.data.sources import BuiltinSource
    from harmony.data.views import ViewMaker, collate_for

    maker = ViewMaker(cfg, task.needs, tokenizer, task.student.visual.patch_size)
    source = BuiltinSource("train", cfg)
    samples = []
    for i in range(batch_size):
        raw = source.load(i % len(source))
        samples.append(maker(raw.image, raw.caption, seed=i))
    return collate_for(cfg)(samples)


def bench_config(preset: str, overrides: list[str], device_name: str, batch_size: int, accum: int) -> Config:
    """The configuration one measurement runs: `preset` with the bench's settings, then the user's overrides."""
    settings = [f"train.batch_size={batch_size}", f"train.device={device_name}", f"train.accum_steps={accum}"]
    return build_config(preset, [*settings, *overrides])


def measure(
    preset: str, overrides: list[str], device_name: str, batch_size: int, steps: int, warmup: int, accum: int = 1
) -> dict[str, Any]:
    """Measure one preset in this process (`accum` micro-batches per step: `train.accum_steps`)."""
    from harmony.train.loop import to_device

    cfg = bench_config(preset, overrides, device_name, batch_size, accum)
    device = resolve_device(device_name)
    trainer = Stepper(cfg, device, DistInfo())
    trainer.set_span(steps_per_epoch=1000, total_steps=100000)
    task = trainer.task
    batch = to_device(make_batch(cfg, task, trainer.tokenizer, batch_size), device)
    passes: list[dict[str, Any]] = []
    hooks = []
    for name in ("student.visual", "teacher.visual", "student.text", "teacher.text"):
        try:
            module = task.get_submodule(name)
        except AttributeError:
            continue
        hooks.append(
            module.register_forward_hook(
                lambda m, a, o, name=name: passes.append({"module": name, "input": list(a[0].shape)})
            )
        )
    with ComponentFlops(components(task)) as counter:
        trainer.train_step(batch)
    for h in hooks:
        h.remove()
    total = counter.total()
    by_component = counter.by_component()
    with SavedActivations(task) as saved:
        trainer.train_step(batch)
    for _ in range(warmup):
        trainer.train_step(batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    sync()
    step_time = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result: dict[str, Any] = {
        "preset": preset,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "batch_size": batch_size,
        "accum_steps": accum,
        "precision": str(trainer.amp_dtype or "fp32").replace("torch.", ""),
        "flops_per_step": total,
        "flops_by_component": by_component,
        "flops_forward_backward": dict(counter.flops),
        "passes": passes,
        "step_time_s": step_time,
        "images_per_s": batch_size / step_time,
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "saved_activations_bytes": saved.peak_bytes,
        "achieved_tflops": total / step_time / 1e12,
    }
    peak_tf = peak_tflops(device)
    if peak_tf:
        result["mfu"] = result["achieved_tflops"] / peak_tf
    return result


def worker_arguments(preset: str, args: argparse.Namespace, accum: int) -> list[str]:
    """The arguments of the worker (`python -m harmony.train.bench ...`) that measures one preset at one K."""
    argv = ["--worker", preset, "--device", args.device, "--batch-size", str(args.batch_size)]
    argv += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--accum-steps", str(accum)]
    return argv + list(args.overrides)


def run_isolated(preset: str, args: argparse.Namespace, accum: int = 1) -> dict[str, Any]:
    """Measure a preset in a fresh interpreter (clean peak memory); a setting the worker refuses is its one-line
    `ConfigError` here, any other failure raises with its stderr."""
    cmd = [sys.executable, "-m", "harmony.train.bench", *worker_arguments(preset, args, accum)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == ConfigError.exit_code:
        raise ConfigError(proc.stderr.strip().splitlines()[-1].removeprefix("harmony: error: "))
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of {preset} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def variants_of(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, overrides) of each setting measured: the presets as given (label ''), then each `--variant`
    (its space-separated `key=value` overrides, applied after the common ones)."""
    return [("", []), *((" ".join(v.split()), v.split()) for v in args.variant if v.strip())]


def with_variant(args: argparse.Namespace, overrides: list[str]) -> argparse.Namespace:
    """`args` with a variant's overrides after the common ones."""
    return argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, *overrides]})


def measure_all(presets: list[str], args: argparse.Namespace, ks: list[int]) -> list[dict[str, Any]]:
    """Every preset at every K under every variant, each in its own worker, labelled with its variant."""
    results = []
    for label, overrides in variants_of(args):
        for preset in presets:
            for k in ks:
                results.append({**run_isolated(preset, with_variant(args, overrides), k), "variant": label})
    return results


def _key(r: dict[str, Any], preset: str | None = None, accum: int | None = None) -> tuple[str, int, str]:
    """What a result is compared by: preset, K, variant (preset or K replaced when given)."""
    return (preset or r["preset"], accum or r.get("accum_steps", 1), r.get("variant", ""))


def with_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {_key(r): r for r in results}
    for r in results:
        _, size = split_preset(r["preset"])
        clip = by_key.get(_key(r, preset=f"clip-{size}"))
        if clip is None:
            continue
        r["ratio_to_clip"] = {
            k: r[k] / clip[k] for k in ("flops_per_step", "step_time_s", "peak_memory_bytes") if clip[k]
        }
        r["ratio_to_clip"]["time_over_flops"] = r["ratio_to_clip"]["step_time_s"] / r["ratio_to_clip"]["flops_per_step"]
    return results


def _label(r: dict[str, Any]) -> str:
    k, variant = r.get("accum_steps", 1), r.get("variant", "")
    return r["preset"] + (f" K={k}" if k != 1 else "") + (f" [{variant}]" if variant else "")


# (result key, header, unit divisor, column width, number format) of the accumulation table
ACCUMULATION_COLUMNS = (
    ("peak_memory_bytes", "peak MB", 2**20, 9, ".0f"),
    ("saved_activations_bytes", "activ. MB", 2**20, 11, ".1f"),
    ("step_time_s", "step s", 1, 9, ".3f"),
    ("flops_per_step", "GFLOP", 1e9, 9, ".2f"),
)


def _ratio_table(title: str, head: str, rows: list[tuple[str, dict[str, Any], dict[str, Any] | None]]) -> str:
    """A table of `ACCUMULATION_COLUMNS`: each row's figures and their ratio to its base."""
    head += "".join(f"{name:>{width}}{'x base':>8}" for _, name, _, width, _ in ACCUMULATION_COLUMNS)
    lines = [title, head, "-" * len(head)]
    for start, r, base in rows:
        row = start
        for key, _, unit, width, number in ACCUMULATION_COLUMNS:
            ratio = r[key] / base[key] if base and base[key] else float("nan")
            row += f"{r[key] / unit:>{width}{number}}{ratio:>8.2f}"
        lines.append(row)
    return "\n".join(lines)


def format_accumulation(results: list[dict[str, Any]]) -> str:
    """Per preset, each K against K = 1: peak memory, saved activations, step time and FLOPs (the extra
    compute of the caching pass), as ratios."""
    base = {_key(r): r for r in results if r.get("accum_steps", 1) == 1}
    width = max(len(r["preset"] + (f" [{r['variant']}]" if r.get("variant") else "")) for r in results) + 2
    rows = []
    for r in results:
        k, name = r.get("accum_steps", 1), r["preset"] + (f" [{r['variant']}]" if r.get("variant") else "")
        rows.append((f"{name:<{width}}{k:>3}{r['batch_size'] // k:>7}", r, base.get(_key(r, accum=1))))
    title = "gradient accumulation (train.accum_steps = K; the same numbers, less memory; base: K=1)"
    return _ratio_table(title, f"{'preset':<{width}}{'K':>3}{'micro':>7}", rows)


def format_variants(results: list[dict[str, Any]]) -> str:
    """Each `--variant` row against the same preset and K without it: what the setting saves (FLOPs of the
    backward of a frozen tower, activations, memory, time)."""
    base = {_key(r): r for r in results if not r.get("variant")}
    rows = [r for r in results if r.get("variant")]
    width = max(len(r["preset"]) + (len(f" K={r['accum_steps']}") if r.get("accum_steps", 1) != 1 else 0) for r in rows)
    variant_width = max(len(r["variant"]) for r in rows) + 2
    table = []
    for r in rows:
        k = r.get("accum_steps", 1)
        name = r["preset"] + (f" K={k}" if k != 1 else "")
        table.append((f"{name:<{width + 2}}{r['variant']:<{variant_width}}", r, base.get((r["preset"], k, ""))))
    title = "settings (--variant) against the same preset without them (base)"
    return _ratio_table(title, f"{'preset':<{width + 2}}{'variant':<{variant_width}}", table)


def format_results(results: list[dict[str, Any]]) -> str:
    width = max(28, *(len(_label(r)) + 2 for r in results))
    head = f"{'preset':<{width}}{'GFLOP/step':>12}{'x clip':>8}{'step s':>9}{'x clip':>8}{'img/s':>9}{'peak MB':>10}{'x clip':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = r.get("ratio_to_clip", {})
        lines.append(
            f"{_label(r):<{width}}{r['flops_per_step'] / 1e9:>12.2f}{ratio.get('flops_per_step', float('nan')):>8.2f}"
            f"{r['step_time_s']:>9.3f}{ratio.get('step_time_s', float('nan')):>8.2f}{r['images_per_s']:>9.1f}"
            f"{r['peak_memory_bytes'] / 2**20:>10.0f}{ratio.get('peak_memory_bytes', float('nan')):>8.2f}"
        )
    for r in results:
        lines.append(f"\n{_label(r)}: FLOPs by component (GFLOP, forward + backward)")
        for label, value in r["flops_by_component"].items():
            lines.append(f"  {label:<28}{value / 1e9:>10.2f}  ({100 * value / r['flops_per_step']:.1f} %)")
        counts: dict[str, list[list[int]]] = {}
        for p in r["passes"]:
            counts.setdefault(p["module"], []).append(p["input"])
        lines.append("  forward passes: " + "; ".join(f"{m} x{len(v)} {v}" for m, v in counts.items()))
    return "\n".join(lines)


def presets_to_run(args: argparse.Namespace) -> list[str]:
    names = [n for item in args.preset for n in item.split(",") if n]
    if not names:
        raise SystemExit("harmony bench: give --preset NAME (repeatable or comma-separated)")
    sizes = {split_preset(n)[1] for n in names}
    wanted = [f"clip-{s}" for s in sorted(sizes) if f"clip-{s}" not in names] + names
    return list(dict.fromkeys(wanted))


def accumulation_values(text: str, batch_size: int) -> list[int]:
    """`--accum-steps 1,2,4` as integers, each dividing the batch; a mistake is one line (exit 2)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"harmony bench: --accum-steps takes whole numbers like 1,2,4, got {text!r}") from None
    wrong = [v for v in values if v <= 0 or batch_size % v]
    if not values or wrong:
        raise SystemExit(
            f"harmony bench: --accum-steps {text}: each must be a positive divisor of --batch-size {batch_size}"
        )
    return list(dict.fromkeys(values))


def cmd_bench_step(args: argparse.Namespace) -> int:
    ks = accumulation_values(args.accum_steps, args.batch_size)
    presets = presets_to_run(args)
    for _, overrides in variants_of(args):  # a wrong preset or override is one line here (ConfigError)
        for preset in presets:
            check_towers(bench_config(preset, [*args.overrides, *overrides], args.device, args.batch_size, ks[0]))
    resolve_device(args.device)  # likewise `--device cuda` on a machine without one (ConfigError)
    results = with_ratios(measure_all(presets, args, ks))
    print(format_results(results))
    if len(ks) > 1:
        print("\n" + format_accumulation(results))
    if args.variant:
        print("\n" + format_variants(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({_label(r): r for r in results}, indent=2) + "\n")
    return 0


def add_bench_step_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", action="append", default=[], help="preset(s) to measure; clip of each size is added")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to measure (default cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (per device)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument(
        "--accum-steps",
        default="1",
        help="micro-batches per step (train.accum_steps), or a list (1,2,4) to compare memory and time per K",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'key=value ...'",
        help="also measure every preset with these overrides (repeatable), e.g. model.freeze=image, and compare",
    )
    p.add_argument("--json", help="write per-preset results here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every preset")


def worker(argv: list[str]) -> int:
    """The measuring worker `run_isolated` starts: one preset at one K, its result as a JSON line on stdout."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    add_bench_step_arguments(parser)
    args = parser.parse_args(argv)
    accum = int(args.accum_steps)
    result = measure(args.worker, list(args.overrides), args.device, args.batch_size, args.steps, args.warmup, accum)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_reported(lambda: worker(sys.argv[1:])))
