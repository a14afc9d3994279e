"""The report of `harmony check gpu`: every part ok / failed / skipped with its error, the figures,
and the acceptance targets next to them (met / not met / not measured), as markdown and JSON."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from harmony.check.plan import Plan
from harmony.check.runner import PartResult
from harmony.core.markdown import markdown_table


@dataclass
class Target:
    name: str
    figure: str  # the measured value as written in the report, or "" when not measured
    met: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "NOT MET")


def _ok_runs(results: dict[str, PartResult]) -> list[dict[str, Any]]:
    bench = results.get("bench")
    return [r for r in (bench.data.get("runs", []) if bench else []) if "error" not in r]


def pairs(runs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(clip, harmony) measured at the same size, batch and mode."""
    index = {(r["preset"], r["batch_size"], r["compiled"]): r for r in runs}
    for (preset, batch, compiled), harmony in index.items():
        if preset.startswith("harmony-"):
            clip = index.get(("clip-" + preset[len("harmony-") :], batch, compiled))
            if clip is not None:
                yield clip, harmony


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def targets(plan: Plan, results: dict[str, PartResult]) -> list[Target]:
    """The acceptance targets against the figures that were measured."""
    runs = _ok_runs(results)
    found: list[Target] = []
    for method, floor in (("clip", 0.40), ("harmony", 0.35)):
        name = f"ViT-B/16 {method} MFU >= {floor:.0%} (bf16, batch {plan.bench_batch}, best of eager/compiled)"
        mfus = [r["mfu"] for r in runs if r["preset"] == f"{method}-{plan.large}" and "mfu" in r]
        best = max(mfus, default=None)
        found.append(Target(name, "" if best is None else _pct(best), None if best is None else best >= floor))
    for clip, harmony in pairs(runs):
        if harmony["batch_size"] != plan.bench_batch:
            continue
        time_ratio = harmony["step_time_s"] / clip["step_time_s"]
        flop_ratio = harmony["flops_per_step"] / clip["flops_per_step"]
        mode = "compiled" if harmony["compiled"] else "eager"
        found.append(
            Target(
                f"{harmony['preset']} / clip time ratio <= 1.1 x FLOP ratio (batch {plan.bench_batch}, {mode})",
                f"{time_ratio:.2f}x time vs {flop_ratio:.2f}x FLOPs = {time_ratio / flop_ratio:.2f}",
                time_ratio <= 1.1 * flop_ratio,
            )
        )
    memory = [
        (h["peak_memory_bytes"] / c["peak_memory_bytes"], h["batch_size"])
        for c, h in pairs(runs)
        if h["preset"] == f"harmony-{plan.small}" and not h["compiled"] and h["batch_size"] == plan.bench_batch
    ]
    name = f"harmony-{plan.small} peak memory <= 3 x clip's (batch {plan.bench_batch}, eager)"
    found.append(Target(name, f"{memory[0][0]:.2f}x" if memory else "", memory[0][0] <= 3.0 if memory else None))
    data = results.get("data")
    for entry in data.data.get("paths", []) if data else []:
        bound = 1.0 if entry["preset"].startswith("clip") else 1.5
        ms = entry["device_augment_ms_per_image"]
        name = f"{entry['preset']} loader worker CPU <= {bound} ms/image with data.device_augment"
        found.append(Target(name, f"{ms:.2f} ms", ms <= bound))
    train = results.get("train")
    share = train.data.get("data_wait_share") if train else None
    name = f"data wait <= 3 % of step time (harmony-{plan.small}, {plan.workers} loader workers)"
    found.append(Target(name, "" if share is None else _pct(share), None if share is None else share <= 0.03))
    return found


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [*markdown_table(head, [list(row) for row in rows]).splitlines(), ""]


def _bench_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    ratio = {
        id(h): h["step_time_s"] / c["step_time_s"] / (h["flops_per_step"] / c["flops_per_step"]) for c, h in pairs(runs)
    }
    rows = []
    for r in runs:
        if "error" in r:
            rows.append(
                [r["preset"], str(r["batch_size"]), "compiled" if r["compiled"] else "eager", r["error"], *[""] * 7]
            )
            continue
        rows.append(
            [
                r["preset"],
                str(r["batch_size"]),
                "compiled" if r["compiled"] else "eager",
                r["precision"],
                f"{r['step_time_s'] * 1000:.1f}",
                f"{r['images_per_s']:.0f}",
                f"{r['peak_memory_bytes'] / 2**20:.0f}",
                f"{r['flops_per_step'] / 1e9:.4g}",
                f"{r['achieved_tflops']:.4g}",
                _pct(r["mfu"]) if "mfu" in r else "—",
                f"{ratio[id(r)]:.2f}" if id(r) in ratio else "",
            ]
        )
    return rows


def markdown(plan: Plan, results: list[PartResult], command: str) -> str:
    by_name = {r.name: r for r in results}
    env = by_name["env"].data if "env" in by_name else {}
    lines = [f"# harmony check gpu — {plan.device}", "", f"`{command}`", ""]
    if plan.device == "cpu":
        lines += ["CPU rehearsal (tiny-test sizes): the figures test the check itself, not performance.", ""]
    keys = ["gpu", "capability", "gpu_memory_gib", "driver", "torch", "cuda", "cudnn", "python", "cpu_cores", "git"]
    lines += _table(["what", "value"], [[k, str(env[k])] for k in keys if k in env])
    peak = env.get("peak_tflops")
    if plan.device == "cuda":
        lines.append(
            f"MFU uses a dense bf16 peak of {peak} TFLOP/s." if peak else "MFU omitted: this GPU's peak is not known."
        )
        lines.append("")
    lines += ["## Parts", ""]
    lines += _table(
        ["part", "status", "seconds", "error"], [[r.name, r.status, f"{r.seconds:.0f}", r.error] for r in results]
    )
    lines += ["## Acceptance targets", ""]
    lines += _table(
        ["target", "figure", "verdict"], [[t.name, t.figure or "—", t.verdict] for t in targets(plan, by_name)]
    )
    tests = by_name["cuda-tests"].data.get("tests", []) if "cuda-tests" in by_name else []
    if tests:
        lines += ["## cuda checks", ""]
        lines += _table(["check", "outcome", "message"], [[t["name"], t["outcome"], t["message"]] for t in tests])
    runs = by_name["bench"].data.get("runs", []) if "bench" in by_name else []
    if runs:
        head = ["preset", "batch", "mode", "precision", "step ms", "img/s", "peak MiB", "GFLOP/step", "TFLOP/s", "MFU"]
        lines += ["## Training step (`harmony bench`)", ""]
        lines += _table([*head, "time/FLOP ratio vs clip"], _bench_rows(runs))
    loader = by_name["data"].data.get("loader") if "data" in by_name else None
    if loader:
        lines += ["## Loader (`harmony bench data`)", ""]
        row = [
            loader["preset"],
            loader["data"],
            str(loader["workers"]),
            str(loader["batch_size"]),
            f"{loader['images_per_s']:.0f}",
        ]
        lines += _table(["preset", "data", "workers", "batch", "images/s"], [row])
    paths = by_name["data"].data.get("paths") if "data" in by_name else None
    if paths:
        lines += ["## Loader worker CPU per image: pixels vs `data.device_augment` (photo-like JPEGs)", ""]
        rows = [
            [
                p["preset"],
                str(p["images"]),
                f"{p['worker_path_ms_per_image']:.2f}",
                f"{p['device_augment_ms_per_image']:.2f}",
                f"{p['device_images_per_s']:.0f}",
            ]
            for p in paths
        ]
        head = ["preset", "images", "worker path ms/img", "device path ms/img", "device decode+crop img/s"]
        lines += _table(head, rows)
    train = by_name["train"].data if "train" in by_name else {}
    if train.get("terms"):
        lines += [f"## Training run ({train['preset']}, {train['steps']} steps)", ""]
        share = train.get("data_wait_share")
        lines += [
            f"{train['images_per_s']:.0f} images/s, {train['step_time_s'] * 1000:.1f} ms per step, data wait "
            f"{'—' if share is None else _pct(share)} of step time, {train['bad_steps']} skipped steps.",
            "",
        ]
        rows = [
            [
                name,
                f"{t['first']:.4f}",
                f"{t['last']:.4f}",
                f"KL {t['kl_first']:.4f} → {t['kl_last']:.4f}" if "kl_first" in t else "the loss",
                "yes" if t["finite"] else "NO",
                "—" if t["falling"] is None else ("yes" if t["falling"] else "NO"),
            ]
            for name, t in train["terms"].items()
        ]
        head = ["loss term", "first quarter", "last quarter", "judged on", "finite", "falling"]
        lines += _table(head, rows)
    return "\n".join(lines)
