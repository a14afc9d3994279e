"""Run logging on rank 0: `metrics.jsonl` (one object per log step, and one per evaluation), TensorBoard
scalars, optionally Weights & Biases (`train.wandb`), and on the console a progress bar, or (`--no-progress`,
e.g. under `harmony repro` or in a batch job's log) one plain line per log step."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harmony.core.errors import ConfigError
from harmony.outputs import OutputError


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop records with step > after_step (lines a killed run wrote after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= after_step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    path.write_text("".join(f"{line}\n" for line in kept))


def elapsed_text(seconds: float) -> str:
    """'42s', '3m05s', '2h01m'."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Turns a failed write into one line naming the folder (a full disk would otherwise end in a traceback)."""
    try:
        yield
    except OSError as exc:
        raise OutputError(
            f"cannot write to '{folder}': {exc.strerror or exc}; free some space, then continue with --resume auto"
        ) from None


def require_wandb() -> None:
    """`train.wandb` needs the `wandb` package (the `wandb` extra): a one-line error without it."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "config key 'train.wandb' needs Weights & Biases, which is not installed: pip install 'harmony-vl[wandb]'"
        )


def start_wandb(project: str, out_dir: Path, config: dict[str, Any]) -> Any:
    """A W&B run in `out_dir/wandb` (`WANDB_MODE=offline` keeps it there); a resumed Harmony run continues the
    same W&B run (its id is kept in `out_dir/wandb-id`)."""
    import wandb

    id_file = out_dir / "wandb-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, dir=str(out_dir), config=config, id=run_id, resume="allow", name=out_dir.name)


class MetricsLogger:
    """metrics.jsonl + TensorBoard + console on rank 0; a failed write (full disk) is one `OutputError` line."""

    def __init__(
        self,
        out_dir: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        progress: bool = True,
        label: str = "",
        wandb_project: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        if wandb_project:
            require_wandb()
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.total_steps, self.label = total_steps, label
        self.started = time.perf_counter()
        self._bar: tqdm[Any] | None = None
        self._writer: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        self.out_dir = out_dir
        with writing(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(self.path, start_step)
            self._file = open(self.path, "a", buffering=1)
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
            self._writer.flush()
        if wandb_project:
            self._wandb = start_wandb(wandb_project, out_dir, config or {})
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def _write(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl, and every finite number to TensorBoard (and W&B) at the record's step."""
        step = int(record["step"])
        scalars = {
            key: value
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
        }
        with writing(self.out_dir):
            self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(record["step"])
        self._write(record)
        loss = float(record.get("loss", float("nan")))
        if self._bar is not None:
            shown = {"loss": f"{loss:.3f}", "img/s": f"{record.get('images_per_s', 0):.0f}"}
            self._bar.set_postfix(shown, refresh=False)
        else:
            print(
                f"{self.label} step {step}/{self.total_steps} loss {loss:.4f} "
                f"elapsed {elapsed_text(time.perf_counter() - self.started)}".strip(),
                flush=True,
            )

    def log_eval(self, record: dict[str, Any]) -> None:
        """An evaluation's row of its own, and one console line with the values of the default weights."""
        if not self.enabled:
            return
        self._write(record)
        shown = ", ".join(
            f"{key[5:]} {value:.4f}" for key, value in record.items() if key.count("/") == 1 and key != "eval/time_s"
        )
        self.message(f"step {int(record['step'])} eval: {shown} ({record['eval/time_s']:.1f} s)")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Flush and close both files, then report a write that failed (a disk that filled up)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        with writing(self.out_dir):
            try:
                self._writer.close()
            finally:
                self._file.close()
