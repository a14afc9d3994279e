"""Every failure a user can act on, in one place: its class and the exit status the commands give it.

`harmony` (every command, `harmony eval` included) and `harmony check` (also as `python -m harmony.check`)
report a `HarmonyError` as one line, `harmony: error: <message>`, and exit with its class's `exit_code`:

    ConfigError       2   a configuration or usage mistake (a key, a flag, a setting, a device this machine lacks)
    DataError         1   data that cannot be used (bad spec, no files, nothing readable, splits that differ)
    CheckpointError   1   a checkpoint that cannot be used (unreadable, wrong format, no text tower for a task)
    OutputError       1   an output path that cannot be written
    TrainingError     1   training cannot continue (e.g. repeated non-finite losses)
    ReproError        1   a method of a reproduction suite failed to train or evaluate

Ctrl-C exits 130 and a closed stdout (`harmony presets | head`) 141. Any other exception is a bug and
surfaces as a traceback. Torch-free, so the command line names these classes without loading torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class HarmonyError(Exception):
    """A failure the user can act on; the message says what and where, in one line."""

    exit_code = 1


class ConfigError(HarmonyError, ValueError):
    """A configuration or usage mistake the user can fix; the message names the key or flag."""

    exit_code = 2


class DataError(HarmonyError, ValueError):
    """A data problem the user can fix (bad spec, no files); the message says what and where."""


class CheckpointError(HarmonyError, ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


class OutputError(HarmonyError, OSError):
    """An output path that cannot be written; the message names the path and why."""


class TrainingError(HarmonyError, RuntimeError):
    """Training cannot continue (e.g. repeated non-finite losses); the message says what to try."""


class ReproError(HarmonyError, RuntimeError):
    """A method failed to train or evaluate; the message names it and where its log is."""


def run_reported(command: Callable[[], int]) -> int:
    """`command()`'s exit status, with a `HarmonyError` reported as one line and its `exit_code`, Ctrl-C
    as 130 and a reader that went away as 141; anything else propagates (a bug shows its traceback)."""
    try:
        return command()
    except HarmonyError as exc:
        print(f"harmony: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("harmony: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`harmony presets | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
