"""Evaluation outputs: a JSON file (config, dataset, metrics, time) and a readable table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
