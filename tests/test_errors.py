"""One table of user-facing errors (`harmony.core.errors`) for `harmony`, `harmony eval` and `harmony check`:
each mapped error is one line with its exit code, and any other exception (a bug) surfaces as a traceback."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

import harmony.check
import harmony.cli
import harmony.loading
from harmony.core import errors
from harmony.core.device import resolve_device
from harmony.eval.suite import PROTOCOLS

MAPPED = [
    errors.ConfigError,
    errors.DataError,
    errors.CheckpointError,
    errors.OutputError,
    errors.TrainingError,
    errors.ReproError,
]
BUGS = [ValueError, TypeError, KeyError, RuntimeError]
CHECK = ["check", "gpu", "--device", "cpu"]


def test_the_table_names_every_user_error_and_its_code() -> None:
    found = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.HarmonyError)}
    assert found == {errors.HarmonyError, *MAPPED}
    assert {c.__name__: c.exit_code for c in MAPPED} == {
        "ConfigError": 2,
        "DataError": 1,
        "CheckpointError": 1,
        "OutputError": 1,
        "TrainingError": 1,
        "ReproError": 1,
    }
    table = errors.__doc__ or ""
    assert all(f"{c.__name__:<17} {c.exit_code}" in table for c in MAPPED)  # the docstring's table is the code's
    # still caught as what they were before the table
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.DataError, ValueError)
    assert issubclass(errors.CheckpointError, ValueError) and issubclass(errors.OutputError, OSError)
    assert issubclass(errors.TrainingError, RuntimeError) and issubclass(errors.ReproError, RuntimeError)


def raising(exc: BaseException) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return run


def eval_raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> Callable[[], int]:
    """`harmony eval knn` whose protocol raises `exc` (the checkpoint loading stubbed out)."""
    monkeypatch.setattr(harmony.loading, "load", lambda *args, **kwargs: object())
    monkeypatch.setitem(PROTOCOLS, "knn", dataclasses.replace(PROTOCOLS["knn"], run=raising(exc)))
    argv = ["eval", "knn", "--checkpoint", "c.pt", "--data", "builtin:shapes:val", "--device", "cpu"]
    return lambda: harmony.cli.main(argv)


def entry_points(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> dict[str, Callable[[], int]]:
    """The three commands, each made to raise `exc` where its work would start."""
    monkeypatch.setattr(harmony.cli, "cmd_presets", raising(exc))
    monkeypatch.setattr(harmony.check, "cmd_check_gpu", raising(exc))
    return {
        "harmony": lambda: harmony.cli.main(["presets"]),
        "harmony eval": eval_raising(monkeypatch, exc),
        "harmony check": lambda: harmony.cli.main(CHECK),
        "python -m harmony.check": lambda: harmony.check.main(CHECK[1:]),
    }


@pytest.mark.parametrize("cls", MAPPED)
def test_each_mapped_error_is_one_line_with_its_code(
    cls: type[errors.HarmonyError], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, command in entry_points(monkeypatch, cls(f"{cls.__name__} says what to fix")).items():
        assert command() == cls.exit_code, name
        assert capsys.readouterr().err == f"harmony: error: {cls.__name__} says what to fix\n", name


@pytest.mark.parametrize("bug", BUGS)
def test_a_bug_is_a_traceback_not_a_user_error(
    bug: type[Exception], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, command in entry_points(monkeypatch, bug("a bug in our code")).items():
        with pytest.raises(bug, match="a bug in our code"):
            command()
        assert "harmony: error" not in capsys.readouterr().err, name


def test_eval_settings_mistakes_are_config_errors() -> None:
    from harmony.eval.cli import parse_sets

    with pytest.raises(errors.ConfigError, match=r"--set 'knn\.ks=5,x': cannot read 'x' as int"):
        parse_sets(["knn.ks=5,x"])
    with pytest.raises(errors.ConfigError, match=r"'segment\.reduce_zero_label=maybe': 'maybe' is not a boolean"):
        parse_sets(["segment.reduce_zero_label=maybe"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_asked_on_a_machine_without_it_is_one_config_error(name: str) -> None:
    with pytest.raises(errors.ConfigError, match=f"device '{name}' asked for, but this machine has no usable CUDA"):
        resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
