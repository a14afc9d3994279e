"""The `harmony` command itself: lazy command table, flags that reach the config, help texts, list flags."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harmony.cli import COMMANDS, build_parser, main
from harmony.train.cli import FLAG_KEYS
from tests.conftest import REPO


@pytest.mark.parametrize("argv", [["presets"], ["--help"], ["train", "--help"]])
def test_light_commands_do_not_import_torch(argv: list[str]) -> None:
    code = (
        "import sys; from harmony.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, 'heavy import'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_help_lists_every_command_with_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, (help_line, _) in COMMANDS.items():
        assert name in out and help_line.split()[0] in out, name


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


def command_parser(command: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]  # type: ignore[no-any-return]


def option_actions(command: str) -> list[argparse.Action]:
    """The options of a command and of its sub-commands (e.g. `bench data`)."""
    found: list[argparse.Action] = []
    pending = [command_parser(command)]
    while pending:
        current = pending.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += list(action.choices.values())
            elif not isinstance(action, argparse._HelpAction):
                found.append(action)
    return found


@pytest.mark.parametrize("command", ["train", "bench", "export", "repro", "demo"])
def test_every_flag_has_help(command: str) -> None:
    missing = [a.option_strings or a.dest for a in option_actions(command) if not a.help]
    assert not missing, missing


def test_every_command_in_the_table_builds_its_parser() -> None:
    for name in COMMANDS:
        parser = command_parser(name)
        nested = [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
        assert any(p.get_default("func") for p in [parser, *nested]), name


TRAIN_FLAG_VALUES = {
    "--data": ("data_spec", "captions.csv", "captions.csv"),
    "--epochs": ("train.epochs", "3.5", 3.5),
    "--max-steps": ("train.max_steps", "7", 7),
    "--batch-size": ("train.batch_size", "12", 12),
    "--accum-steps": ("train.accum_steps", "4", 4),
    "--device": ("train.device", "cpu", "cpu"),
    "--precision": ("train.precision", "bf16", "bf16"),
    "--seed": ("train.seed", "5", 5),
    "--workers": ("data.num_workers", "3", 3),
    "--image-key": ("data.csv_image_key", "path", "path"),
    "--caption-key": ("data.csv_caption_key", "title", "title"),
    "--init-weights": ("model.init_weights", "teacher", "teacher"),
}
# --init opens its source to set the architecture: tests/test_init_sources.py checks it reaches config.yaml
NEEDS_A_SOURCE = {"--init": "model.init"}


def test_the_flag_table_covers_every_config_flag_of_train() -> None:
    not_config = {"preset", "out", "resume", "overwrite", "force", "print_config", "no_progress", "overrides"}
    dests = {a.dest for a in option_actions("train")} - not_config
    assert dests == set(FLAG_KEYS)
    flags = {**TRAIN_FLAG_VALUES, **NEEDS_A_SOURCE}
    assert {FLAG_KEYS[flag[2:].replace("-", "_")] for flag in flags} == set(FLAG_KEYS.values())


@pytest.mark.parametrize("flag", sorted(TRAIN_FLAG_VALUES))
def test_every_train_flag_reaches_the_config(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    key, text, value = TRAIN_FLAG_VALUES[flag]
    assert main(["train", "--preset", "clip-tiny-test", flag, text, "--print-config"]) == 0
    node = yaml.safe_load(capsys.readouterr().out)
    for part in key.split("."):
        node = node[part]
    assert node == value


def test_the_saved_config_holds_the_flags(tmp_path: Path) -> None:
    args = ["--preset", "clip-tiny-test", "--out", str(tmp_path), "--max-steps", "1", "--workers", "0", "--seed", "9"]
    assert main(["train", *args, "--image-key", "img", "--caption-key", "text", "--no-progress"]) == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"]["csv_image_key"] == "img" and saved["data"]["csv_caption_key"] == "text"
    assert saved["train"]["seed"] == 9 and saved["train"]["max_steps"] == 1


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=nan",
        "optim.lr=inf",
        "optim.min_lr=-inf",
        "objectives.clip.weight=NaN",
        "data.augment.global_scale=0.5,inf",
        "optim.betas=[0.9, .nan]",
    ],
)
def test_non_finite_numbers_are_refused(override: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "clip-tiny-test", override, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be a finite number" in err and override.split("=")[0] in err


def test_non_finite_numbers_in_a_yaml_config_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("objectives: {clip: {}}\noptim: {lr: .inf}\n")
    assert main(["train", "--preset", str(config), "--print-config"]) == 2
    assert "config key 'optim.lr' must be a finite number" in capsys.readouterr().err


def test_list_valued_flags_take_one_value_or_a_comma_list(capsys: pytest.CaptureFixture[str]) -> None:
    from harmony.train.bench import presets_to_run

    one = argparse.Namespace(preset=["harmony-tiny-test"])
    assert presets_to_run(one) == ["clip-tiny-test", "harmony-tiny-test"]
    several = argparse.Namespace(preset=["mae-tiny-test,clip-tiny-test", "ibot-tiny-test"])
    assert presets_to_run(several) == ["mae-tiny-test", "clip-tiny-test", "ibot-tiny-test"]
    assert main(["train", "--preset", "clip-tiny-test", "data.augment.global_scale=0.5", "--print-config"]) == 2
    assert "expects a list of 2 numbers, got '0.5'" in capsys.readouterr().err
    assert main(["train", "--preset", "clip-tiny-test", "data.augment.global_scale=0.5,1", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["augment"]["global_scale"] == [0.5, 1.0]


def test_gitignore_covers_what_the_readme_examples_write() -> None:
    import re

    readme = (REPO / "README.md").read_text()
    outs = {m.strip("'\"") for m in re.findall(r"--out (\S+)", readme) if not m.startswith("DIR")}
    outs |= {"vit_s16.json", "runs/demo"}  # the timm sidecar, `make demo`
    assert len(outs) >= 8
    for path in sorted(outs):
        proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, check=False)
        assert proc.returncode == 0, f"{path} is not ignored"


def test_bench_sorts_overrides_from_option_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """`harmony bench` holds key=value words back from its `data` subcommand, but not an option's value."""
    import harmony.train.bench

    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(harmony.train.bench, "cmd_bench_step", lambda args: seen.append(args) or 0)
    argv = ["bench", "--json", "a=b.json", "--preset", "clip-tiny-test", "model.context_length=77", "x.y=1"]
    assert main(argv) == 0
    assert seen[0].json == "a=b.json" and seen[0].overrides == ["model.context_length=77", "x.y=1"]
