"""The reproduction report: the table of methods x metrics (best in bold; or the suite's own tables), the paper's
numbers beside ours, bar charts, loss curves."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import torch

from harmony.repro.suite import Suite, TableSpec

PAPER_NOTE = "Values in %; difference = ours - paper, in points."


def metric(evals: dict[str, Any], path: str) -> float | None:
    """`task.metric` from a method's evaluation results (None when skipped or missing)."""
    task, key = path.split(".", 1)
    value = (evals.get(task) or {}).get("metrics", {}).get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def columns_of(suite: Suite, table: TableSpec | None) -> dict[str, str]:
    """A table's columns (label -> task.metric): its own, else the suite's."""
    return suite.columns if table is None or not table.columns else table.columns


def table_rows(
    suite: Suite, runs: dict[str, dict[str, Any]], table: TableSpec | None = None
) -> tuple[list[str], list[list[float | None]]]:
    """Row names and values of the main table (every run, the suite's columns) or of one of `suite.tables`."""
    names = list(runs) if table is None else [r for m in table.methods if (r := f"{m}-{suite.size}") in runs]
    columns = columns_of(suite, table)
    values = [[metric(runs[name]["evals"], path) for path in columns.values()] for name in names]
    return names, values


def markdown_table(
    suite: Suite, runs: dict[str, dict[str, Any]], bold: bool = True, table: TableSpec | None = None
) -> str:
    names, values = table_rows(suite, runs, table)
    columns = list(columns_of(suite, table))
    best = [max((v for row in values if (v := row[c]) is not None), default=None) for c in range(len(columns))]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in zip(names, values):
        cells = []
        for c, value in enumerate(row):
            if value is None:
                cells.append("—")
                continue
            text = f"{100 * value:.1f}"
            cells.append(f"**{text}**" if bold and best[c] is not None and value == best[c] else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table(suite: Suite, runs: dict[str, dict[str, Any]]) -> str:
    """Ours beside the paper's reported numbers, one row per method and metric the paper reports, with the
    difference (ours - paper, in points); '' when the suite holds no paper numbers."""
    if not suite.paper.results:
        return ""
    lines = ["| method | metric | ours | paper | difference |", "|---|---|---:|---:|---:|"]
    for preset, run in runs.items():
        reported = suite.paper.results.get(suite.method_of(preset), {})
        for column, paper in reported.items():
            ours = metric(run["evals"], suite.columns[column])
            cells = ("—", "—") if ours is None else (f"{100 * ours:.1f}", f"{100 * ours - paper:+.1f}")
            lines.append(f"| {preset} | {column} | {cells[0]} | {paper:.1f} | {cells[1]} |")
    return "\n".join(lines)


def plain_table(suite: Suite, runs: dict[str, dict[str, Any]], table: TableSpec | None = None) -> str:
    """A table for a terminal (values in %, '-' when not applicable): the main one, or one of `suite.tables`."""
    names, values = table_rows(suite, runs, table)
    if not names:
        return ""
    columns = list(columns_of(suite, table))
    width = max(len(n) for n in names) + 2
    head = f"{'method':<{width}}" + "".join(f"{c:>{max(len(c), 7) + 2}}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, row in zip(names, values):
        cells = "".join(
            f"{('-' if v is None else f'{100 * v:.1f}'):>{max(len(c), 7) + 2}}" for c, v in zip(columns, row)
        )
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join([table.title, *lines] if table is not None and table.title else lines)


def plain_tables(suite: Suite, runs: dict[str, dict[str, Any]]) -> str:
    """The suite's tables for a terminal: its `tables`, or else the one of every method."""
    parts = [plain_table(suite, runs, t) for t in suite.tables] if suite.tables else [plain_table(suite, runs)]
    return "\n\n".join(p for p in parts if p)


def tables_of(suite: Suite, runs: dict[str, dict[str, Any]]) -> list[str]:
    """The report's lines for its tables: the suite's `tables` (a heading and a table each), or else the one of
    every method."""
    if not suite.tables:
        return [markdown_table(suite, runs), ""]
    lines: list[str] = []
    for index, table in enumerate(suite.tables):
        if table_rows(suite, runs, table)[0]:
            lines += [f"## {table.title or f'Table {index + 1}'}", "", markdown_table(suite, runs, table=table), ""]
    return lines


def bar_charts(suite: Suite, runs: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values = table_rows(suite, runs)
    paths = []
    for c, column in enumerate(suite.columns):
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 3.2))
        heights = [100 * (v if (v := row[c]) is not None else 0.0) for row in values]
        bars = ax.bar(
            range(len(names)), heights, color=["#c44e52" if n.startswith("harmony") else "#4c72b0" for n in names]
        )
        for bar, row in zip(bars, values):
            value = row[c]
            label = "n/a" if value is None else f"{100 * value:.1f}"
            ax.annotate(
                label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
            )
        ax.set_xticks(range(len(names)), [n.rsplit("-" + suite.size, 1)[0] for n in names], rotation=30, ha="right")
        ax.set_ylabel("%")
        ax.set_title(column)
        fig.tight_layout()
        path = folder / f"bar_{_slug(column)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def loss_curves(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per method: total loss and every loss term against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, run) in zip(axes.flat, runs.items()):
        records = [
            json.loads(line) for line in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines() if line
        ]
        steps = [r["step"] for r in records]
        for key in ["loss", *sorted(k for k in records[0] if k.startswith("loss_"))] if records else []:
            ax.plot(steps, [r.get(key) for r in records], label=key, linewidth=1.4 if key == "loss" else 0.9)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(suite: Suite, out: Path, runs: dict[str, dict[str, Any]]) -> Path:
    charts = bar_charts(suite, runs, out)
    curves = loss_curves(runs, out / "loss_curves.png")
    budget = ", ".join(suite.train.overrides) or "preset defaults"
    own = {m: o for m, o in suite.train.per_method.items() if f"{m}-{suite.size}" in runs}
    versus = paper_table(suite, runs)
    times = ", ".join(
        f"{n}: {r['train'].get('train_time_s', 0) / 60:.1f} min"
        for n, r in runs.items()
        if r["train"].get("train_time_s")
    )
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    lines = [
        f"# Harmony reproduction: suite `{suite.name}`",
        "",
        suite.description,
        "",
        f"- model size: `{suite.size}`; training data: `{suite.train.data}`; budget (same for every method): {budget}",
        *[f"- `{m}` also: {', '.join(o)}" for m, o in own.items()],
        f"- evaluation data: `{suite.eval.data}`"
        + (f", training split `{suite.eval.train}`" if suite.eval.train else ""),
        *[
            f"- `{t.name}`: `{t.data}`" + (f", training split `{t.train}`" if t.train else "")
            for t in map(suite.eval.task, suite.eval.tasks)
            if (t.data, t.train) != (suite.eval.data, suite.eval.train)
        ],
        f"- device: {device}; training time per method: {times or 'reused from earlier runs'}",
        "",
        "Values in %, best in bold; — where a protocol does not apply (no text tower).",
        "",
        *tables_of(suite, runs),
        *[f"![{p.stem}]({p.name})" for p in charts],
        "",
        *([f"## Beside the paper ({suite.paper.source})", "", PAPER_NOTE, "", versus, ""] if versus else []),
        "## Loss curves",
        "",
        f"![loss curves]({curves.name})",
        "",
        "Raw results: `results.json`; per-method evaluation JSON in `evals/`, runs in `runs/`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")
