"""Evaluation outputs: a JSON file (config, dataset, settings, metrics, time) and a readable table."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from harmony.core.colors import WHITE
from harmony.eval.images import Colour, background_name, skip_line
from harmony.loading import Pretrained


def format_table(rows: list[tuple[str, Any]], title: str = "") -> str:
    width = max([len(k) for k, _ in rows] + [6])
    lines = [title] if title else []
    lines.append(f"{'metric':<{width}}  value")
    lines.append(f"{'-' * width}  ---------")
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def write_result(path: Path | None, result: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def make_result(
    task: str,
    pretrained: Pretrained,
    dataset: dict[str, Any],
    settings: Any,
    metrics: dict[str, float],
    started: float,
    background: Colour = WHITE,
    **extra: Any,
) -> dict[str, Any]:
    """The common result record every protocol returns (and `--out` writes as JSON); the settings
    include the background transparent images were composited over."""
    recorded = asdict(settings) if is_dataclass(settings) and not isinstance(settings, type) else dict(settings)
    recorded["alpha_background"] = background_name(background)
    return {
        "task": task,
        "checkpoint": str(pretrained.path),
        "method": pretrained.config.name,
        "weights": pretrained.weights,
        "step": pretrained.step,
        "dataset": dataset,
        "settings": recorded,
        "metrics": metrics,
        **extra,
        "time_s": round(time.perf_counter() - started, 3),
    }


def result_table(result: dict[str, Any]) -> str:
    """Every metric of a result, one row each, titled with task, data and weights."""
    rows: list[tuple[str, Any]] = list(result["metrics"].items())
    rows.append(("time_s", result["time_s"]))
    spec = result["dataset"].get("spec", "")
    title = f"{result['task']} on {spec} ({result['weights']} weights, step {result['step']})"
    return format_table(rows, title)


def report_skips(result: dict[str, Any]) -> None:
    """One stderr line when a protocol skipped unreadable samples."""
    dataset = result.get("dataset", {})
    line = skip_line(result["task"], dataset.get("skipped", {}))
    if line:
        print(line, file=sys.stderr, flush=True)
