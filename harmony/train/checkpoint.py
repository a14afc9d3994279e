"""Checkpoints: atomic writes, keep-last-k, safe loading, clear errors.

A checkpoint is a plain dict of tensors and primitives, loaded with `weights_only=True`:
format/version, the resolved config, the git revision, the step and epoch, the task state (students,
teachers, heads, centres), optimiser, loss scaler and RNG states.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

FORMAT = "harmony-checkpoint"
VERSION = 1
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a Harmony checkpoint; every failure is a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pt"
        path = candidate if candidate.exists() else path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a Harmony checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint '{path}' has version {state['version']}; this Harmony reads <= {VERSION}")
    return state


def step_checkpoints(folder: Path) -> list[Path]:
    """Periodic checkpoints in a folder, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest(folder: Path) -> Path | None:
    """The newest checkpoint in `folder` that loads (half-written files are never complete: they are
    `.tmp` until renamed; an unreadable file is skipped)."""
    candidates = [folder / "last.pt", *reversed(step_checkpoints(folder))]
    best: tuple[int, Path] | None = None
    for path in candidates:
        if not path.is_file():
            continue
        try:
            step = int(load(path)["step"])
        except CheckpointError:
            continue
        if best is None or step > best[0]:
            best = (step, path)
    return best[1] if best else None


def prune(folder: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` periodic checkpoints (last.pt is never deleted)."""
    if keep_last <= 0:
        return
    for path in step_checkpoints(folder)[:-keep_last]:
        path.unlink(missing_ok=True)


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` with a message that names the mismatch instead of a traceback."""
    check_state_keys(module, state, what)
    module.load_state_dict(state, strict=True)


def check_state_keys(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise a CheckpointError naming missing, unexpected or reshaped entries (works for FSDP too:
    the full shape of a sharded parameter is compared)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(
            f"{what} does not match this model: " + ", ".join(parts) + "; was it written with another config?"
        )
