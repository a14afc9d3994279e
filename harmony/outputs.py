"""Output paths checked before any work starts, so that a long computation is never lost to an
unwritable `--out` at the end. `OutputError` is reported by the CLI as one line with exit status 1."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from harmony.core.errors import OutputError

# the temporary files of `_probe_directory`: another process (a rank of the same run) may hold one for a moment,
# so a folder holding only these counts as empty
PROBE_PREFIX = ".harmony-write-test-"


def _first_existing(path: Path) -> Path:
    """`path` itself or its nearest existing ancestor."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_directory(directory: Path, flag: str, target: Path) -> None:
    """Write and remove a temporary file in `directory` (the only test that holds for ACLs and read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=directory)
    except OSError as exc:
        raise OutputError(f"{flag} {target}: cannot write in {directory} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def _check_dir(directory: Path, flag: str, named: Path, kind: str) -> None:
    """Raise OutputError (naming `named`, the path the user gave) unless `directory` is or can become writable."""
    existing = _first_existing(directory)
    if not existing.is_dir():
        what = "is a file" if existing == named else f"lies under {existing}, which is a file"
        raise OutputError(f"{flag} {named}: {what}; give a {kind} path")
    _probe_directory(existing, flag, named)


def check_output_dir(path: Path | str, flag: str = "--out") -> Path:
    """Make sure `path` is, or can become, a writable directory; creates nothing. Returns it as a Path."""
    target = Path(path)
    _check_dir(target, flag, target, "directory")
    return target


def check_output_file(path: Path | str, flag: str = "--out") -> Path:
    """Make sure a file can be written at `path` (its folder exists or can be created); creates nothing."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{flag} {target}: is a directory; give a file path")
    _check_dir(target.parent, flag, target, "file")
    return target
