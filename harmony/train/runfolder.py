"""One run per folder: a new run never lands on an old one, and two processes never share one.

`claim` runs on rank 0 before any file is written. It takes an exclusive `flock` on a lock file in
the folder (the kernel drops it when the process ends, however it ends), then refuses a folder that
already holds files unless the run resumes (`--resume`) or starts over (`--overwrite`, which deletes
the previous run's checkpoints, metrics, TensorBoard events and config). Without the refusal a new
run would overwrite `last.pt`, rewrite `metrics.jsonl` and leave old `step_*.pt` behind for a later
`--resume auto` to pick.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from harmony.outputs import PROBE_PREFIX, OutputError, check_output_dir

LOCK_FILE = ".harmony.lock"
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "config.yaml", "best.json", "wandb", "wandb-id")


class RunLock:
    """An exclusive lock on a run folder, held until `release()` or the end of the process."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self._fd, 64).decode(errors="replace").strip() or "unknown"
            self.release()
            raise OutputError(
                f"--out {folder}: another harmony process (pid {holder}) is writing this run folder; "
                "wait for it to finish or give another --out"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def continues_in(folder: Path, resume: str | None) -> bool:
    """Whether `--resume` continues the run in `folder` ('auto', or one of its own checkpoints)."""
    if resume is None:
        return False
    return resume == "auto" or folder.resolve() in Path(resume).resolve().parents


def claim(folder: Path, resume: str | None, overwrite: bool) -> RunLock:
    """Lock `folder` for this run and make sure it holds no other run (see the module docstring).
    Resuming a checkpoint from elsewhere counts as a new run here (its step would mix with theirs)."""
    check_output_dir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder)
    present = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE and not p.name.startswith(PROBE_PREFIX))
    if present and not continues_in(folder, resume):
        shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        is_run = (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file()
        problem = None
        if not overwrite and resume is not None:
            problem = (
                f"--out {folder} already holds a run ({shown}); continuing {resume} there would mix the two: "
                "give a new --out, or --overwrite to replace that run"
            )
        elif not overwrite:
            problem = (
                f"--out {folder} is not empty ({shown}): continue that run with --resume auto, "
                "start it over with --overwrite, or give a new --out"
            )
        elif not is_run:
            problem = f"--out {folder} holds files that are not a Harmony run ({shown}); give a new or empty --out"
        if problem:
            lock.release()
            raise OutputError(problem)
        for name in RUN_FILES:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return lock
