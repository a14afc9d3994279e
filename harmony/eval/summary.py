"""One markdown report with plots over the suite results of one or more checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harmony.core.markdown import markdown_table

Runs = dict[str, dict[str, dict[str, Any]]]  # checkpoint label -> task -> result

HEADLINE = [
    ("zeroshot", "top1"),
    ("retrieval", "i2t_r1"),
    ("retrieval", "t2i_r1"),
    ("retrieval", "mean_recall"),
    ("knn", "k20_top1"),
    ("linear", "top1"),
    ("finetune", "top1"),
    ("segment", "linear_mIoU"),
    ("segment", "fpn_mIoU"),
    ("detect", "box_AP"),
    ("detect", "mask_AP"),
    ("attention", "attn_jaccard"),
    ("attention", "text_precision"),
]


def metric(runs: Runs, label: str, task: str, name: str) -> float | None:
    value = runs[label].get(task, {}).get("metrics", {}).get(name)
    return float(value) if value is not None else None


def headline_rows(runs: Runs) -> list[tuple[str, list[float | None]]]:
    """(task/metric, one value per checkpoint) for every headline metric some checkpoint has."""
    rows = []
    for task, name in HEADLINE:
        values = [metric(runs, label, task, name) for label in runs]
        if any(v is not None for v in values):
            rows.append((f"{task}/{name}", values))
    return rows


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_headline(runs: Runs, path: Path) -> None:
    """Grouped bars: each headline metric, one bar per checkpoint."""
    plt = _pyplot()
    rows = headline_rows(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 3.6))
    width = 0.8 / max(len(runs), 1)
    for j, label in enumerate(runs):
        xs = [i + j * width for i in range(len(rows))]
        ax.bar(xs, [v[j] or 0.0 for _, v in rows], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([name for name, _ in rows], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: Runs, path: Path) -> bool:
    """Training-loss curves of the protocols that train (fine-tune, segmentation, detection), k-NN
    accuracy against k and the linear-probe lr sweep; False when there is nothing to draw."""
    panels: list[tuple[str, dict[str, tuple[list[float], list[float]]]]] = []
    for task in ("finetune", "segment", "detect"):
        lines: dict[str, tuple[list[float], list[float]]] = {}
        for label, results in runs.items():
            for name, ys in results.get(task, {}).get("curve", {}).items():
                lines[f"{label} {name}"] = ([float(x) for x in range(1, len(ys) + 1)], ys)
        if lines:
            panels.append((f"{task}: training loss", lines))
    knn = {
        label: (
            [float(k) for k in r["knn"].get("ks_used", r["knn"]["settings"]["ks"])],
            [r["knn"]["metrics"][f"k{k}_top1"] for k in r["knn"].get("ks_used", r["knn"]["settings"]["ks"])],
        )
        for label, r in runs.items()
        if "metrics" in r.get("knn", {})
    }
    if knn:
        panels.append(("k-NN top-1 vs k", knn))
    sweep: dict[str, tuple[list[float], list[float]]] = {}
    for label, r in runs.items():
        for row in r.get("linear", {}).get("sweep", []):
            xs, ys = sweep.setdefault(f"{label} {row['pooling']} n={row['n_blocks']}", ([], []))
            xs.append(math.log10(row["lr"]))
            ys.append(row["heldout_top1"])
    if sweep:
        panels.append(("linear: held-out top-1 vs log10 lr", sweep))
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(runs: Runs, out_dir: Path, title: str = "Harmony evaluation") -> Path:
    """`<out_dir>/report.md` with the headline table, plots, every metric and the attention maps."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = list(runs)
    lines = [f"# {title}", ""]
    info = []
    for label in labels:
        first = next((r for r in runs[label].values() if "checkpoint" in r), {})
        info.append([label, first.get("method"), first.get("step"), first.get("weights"), first.get("checkpoint")])
    lines += [markdown_table(["run", "method", "step", "weights", "checkpoint"], info), "", "## Headline", ""]
    lines += [markdown_table(["metric", *labels], [[name, *vals] for name, vals in headline_rows(runs)]), ""]
    plot_headline(runs, out_dir / "headline.png")
    lines += ["![headline metrics](headline.png)", ""]
    if plot_curves(runs, out_dir / "curves.png"):
        lines += ["![training curves and sweeps](curves.png)", ""]
    tasks = list(dict.fromkeys(t for r in runs.values() for t in r))
    for task in tasks:
        lines += [f"## {task}", ""]
        names = list(dict.fromkeys(n for label in labels for n in runs[label].get(task, {}).get("metrics", {})))
        rows = [[n, *(metric(runs, label, task, n) for label in labels)] for n in names]
        rows.append(["time_s", *(runs[label].get(task, {}).get("time_s") for label in labels)])
        for label in labels:
            if "skipped" in runs[label].get(task, {}):
                lines += [f"- {label}: skipped ({runs[label][task]['skipped']})"]
        lines += [markdown_table(["metric", *labels], rows), ""]
        for label in labels:
            for f in runs[label].get(task, {}).get("files", []):
                rel = (
                    Path(f).resolve().relative_to(out_dir.resolve())
                    if Path(f).resolve().is_relative_to(out_dir.resolve())
                    else Path(f)
                )
                lines += [f"{label}: ![{rel.name}]({rel.as_posix()})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
