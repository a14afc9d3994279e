"""Checkpoints: atomic writes, keep-last-k, safe loading, clear errors.

A checkpoint is a plain dict of tensors and primitives, loaded with `weights_only=True`:
format/version, the resolved config, the git revision, the step and epoch, the task state (students,
teachers, heads, centres), optimiser, loss scaler and RNG states.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import torch

from harmony.core.errors import CheckpointError

FORMAT = "harmony-checkpoint"
VERSION = 1
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


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


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, a read-only folder); the last one is intact."""


def state_bytes(state: Any) -> int:
    """The bytes of the tensors in a (nested) checkpoint state: about the size of its file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def megabytes(size: float) -> str:
    return f"{size / 2**20:.1f} MB"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves a torn file. A write
    that fails (no space left, ...) removes the temp file and raises CheckpointWriteError in one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as RuntimeError ('file write failed')
        tmp.unlink(missing_ok=True)
        free, needed = shutil.disk_usage(path.parent).free, state_bytes(state)
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = "no space left on device" if free < needed else f"the write failed ({str(exc).splitlines()[0]})"
        raise CheckpointWriteError(
            f"cannot write checkpoint '{path}': {reason}; a checkpoint needs about {megabytes(needed)} and "
            f"'{path.parent}' has {megabytes(free)} free. Nothing was overwritten: free some space, then continue "
            "with --resume auto"
        ) from None


EXPECTED = "a Harmony training checkpoint (a run folder, or its checkpoints/last.pt or step_*.pt)"


def _safetensors_header(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def describe_unreadable(path: Path) -> str:
    """What a file that torch cannot load actually is, in words a user can act on."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if _safetensors_header(head):
        return "a safetensors export (weights only, for timm or open_clip: load it with those libraries)"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return f"a truncated or damaged file ({size} bytes; a zip archive without its end: an interrupted copy?)"
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "a zip archive that is not a PyTorch checkpoint"
        return f"a damaged PyTorch checkpoint ({size} bytes)"
    if head.startswith(b"\x80"):
        return "a pickle that is not a plain PyTorch checkpoint (it holds Python objects, which are not loaded)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a PyTorch checkpoint (unknown binary content, {size} bytes)"
    return f"a text file, not a PyTorch checkpoint (it starts with {head[:40].decode().splitlines()[0]!r})"


def resolve(path: str | Path) -> Path:
    """The checkpoint file `path` names: itself, or for a run folder its checkpoints/last.pt."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"'{path}' is a folder without checkpoints/last.pt; expected {EXPECTED}")
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise CheckpointError(f"checkpoint '{path}' {what}; expected {EXPECTED}")
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu", lazy: bool = False) -> dict[str, Any]:
    """Load and check a Harmony checkpoint; every failure is a one-line CheckpointError.
    `lazy` maps the tensors from the file instead of reading them (for a look at config and step)."""
    path = resolve(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=lazy)
    except Exception:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"'{path}' cannot be loaded: {describe_unreadable(path)}; expected {EXPECTED}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        with open(path, "rb") as handle:
            export = _safetensors_header(handle.read(16))
        what = describe_unreadable(path) if export else "a PyTorch file but not a Harmony checkpoint"
        raise CheckpointError(f"'{path}' is {what}; expected {EXPECTED}")
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
            step = int(load(path, lazy=True)["step"])
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
