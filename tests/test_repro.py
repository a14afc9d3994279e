"""`harmony repro` end to end on a micro suite: training, evaluation, report structure, resume."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harmony.config import ConfigError
from harmony.presets import build_config
from harmony.repro.report import markdown_table
from harmony.repro.suite import Suite, load_suite, suite_names
from tests.conftest import Cli, in_process

MICRO_SUITE = """\
description: two methods, a few steps
size: tiny-test
methods: [clip, mae]
train:
  data: builtin:shapes
  overrides: [train.max_steps=3, data.num_workers=0]
eval:
  data: builtin:shapes:val
  workers: 0
  tasks:
    zeroshot: {}
    knn: {max_train: 64}
columns:
  zero-shot top-1: zeroshot.top1
  k-NN top-1: knn.k20_top1
"""


@pytest.fixture(scope="module")
def micro_repro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """(suite file, output folder, the command's answer) of a first `harmony repro` of the micro suite."""
    folder = tmp_path_factory.mktemp("micro")
    suite_file = folder / "micro.yaml"
    suite_file.write_text(MICRO_SUITE)
    out = folder / "repro"
    return suite_file, out, in_process("repro", "--suite", str(suite_file), "--out", str(out), "--device", "cpu")


def test_micro_suite_end_to_end_and_resume(
    micro_repro: tuple[Path, Path, subprocess.CompletedProcess[str]], cli: Cli
) -> None:
    suite_file, out, proc = micro_repro
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[repro] training clip-tiny-test" in proc.stdout and "[repro] training mae-tiny-test" in proc.stdout
    progress = [line for line in proc.stdout.splitlines() if " step " in line]
    assert len(progress) == 4 and re.fullmatch(
        r"\[repro\] mae-tiny-test step 3/3 loss \d+\.\d{4} elapsed \d+s", progress[-1]
    )
    assert f"report: {out / 'report.md'}" in proc.stdout

    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("|")]
    assert rows[0] == "| method | zero-shot top-1 | k-NN top-1 |"
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["clip-tiny-test", "mae-tiny-test"]
    clip_row, mae_row = (r.split("|")[2:-1] for r in rows[2:])
    assert mae_row[0].strip() == "—", "MAE has no text tower: zero-shot does not apply"
    assert re.fullmatch(r"\*\*\d+\.\d\*\*", clip_row[0].strip()), "the only zero-shot value is the best"
    assert "**" in clip_row[1] + mae_row[1], "the best k-NN value is bold"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / image).is_file() and (out / image).stat().st_size > 1000, image
    assert {"bar_zero_shot_top_1.png", "bar_k_nn_top_1.png", "loss_curves.png"} <= {p.name for p in out.glob("*.png")}

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"clip-tiny-test", "mae-tiny-test"}
    assert results["clip-tiny-test"]["train"]["steps"] == 3
    assert 0.0 <= results["clip-tiny-test"]["evals"]["zeroshot"]["metrics"]["top1"] <= 1.0
    assert results["mae-tiny-test"]["evals"]["zeroshot"]["skipped"] == "no text tower"
    assert (out / "evals" / "clip-tiny-test" / "knn.json").is_file()

    again = cli("repro", "--suite", str(suite_file), "--out", str(out), "--device", "cpu")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[repro] training" not in again.stdout, "finished methods are not trained again"
    assert "[repro] clip-tiny-test: knn" not in again.stdout, "cached evaluations are reused"
    assert json.loads((out / "results.json").read_text()) == results

    suite_file.write_text(MICRO_SUITE.replace("knn: {max_train: 64}", "knn: {max_train: 32}"))
    changed = cli("repro", "--suite", str(suite_file), "--out", str(out), "--device", "cpu")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "[repro] clip-tiny-test: knn" in changed.stdout, "changed settings are evaluated again"
    assert "[repro] clip-tiny-test: zeroshot" not in changed.stdout
    assert json.loads((out / "evals" / "clip-tiny-test" / "knn.json").read_text())["settings"]["max_train"] == 32

    shutil.rmtree(out / "runs" / "mae-tiny-test")
    retrained = cli("repro", "--suite", str(suite_file), "--out", str(out), "--device", "cpu")
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    assert (
        "[repro] training mae-tiny-test" in retrained.stdout
        and "[repro] training clip-tiny-test" not in retrained.stdout
    )
    assert "[repro] mae-tiny-test: knn" in retrained.stdout, "a retrained method's old evaluations are not reused"
    assert "[repro] clip-tiny-test: knn" not in retrained.stdout


def test_builtin_suites_load() -> None:
    assert {"demo", "shapes-tiny", "shapes-small", "paper-table1", "paper-table4"} <= set(suite_names())
    data = {"train_data": "cc3m", "imagenet": "imagenet", "ade20k": "ade20k"}
    given = {"paper-table1": {**data, "coco": "coco"}, "paper-table4": data}
    for name in suite_names():
        suite = load_suite(name, given.get(name))
        for run in suite.presets(with_ablations=True):  # every run is a preset with valid settings
            build_config(suite.preset_of(run), suite.overrides_for(run))
        if name != "lecture-tiny":  # the self-supervised methods alone
            assert "clip" in suite.methods and "harmony" in suite.methods, name
    table = load_suite("shapes-tiny")
    assert table.methods == ["clip", "slip", "maskclip", "ibot", "mae", "harmony"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("methods: [clip]\ncolour: 1\n", "colour"),
        ("methods: []\n", "methods"),
        ("methods: [clip]\neval: {tasks: {knn: {}}}\ncolumns: {x: zeroshot.top1}\n", "zeroshot"),
    ],
)
def test_bad_suite_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_suite(str(path))


def test_markdown_table_bolds_best_per_column() -> None:
    suite = Suite(name="t", methods=["a", "b"], columns={"m1": "knn.top1", "m2": "linear.top1"})
    runs = {
        "a": {"evals": {"knn": {"metrics": {"top1": 0.5}}, "linear": {"metrics": {"top1": 0.9}}}},
        "b": {"evals": {"knn": {"metrics": {"top1": 0.7}}, "linear": {"skipped": "no"}}},
    }
    lines = markdown_table(suite, runs).splitlines()
    assert lines[2] == "| a | 50.0 | **90.0** |"
    assert lines[3] == "| b | **70.0** | — |"


def test_a_method_trained_with_other_settings_is_trained_again_from_scratch(
    tmp_path: Path, micro_repro: tuple[Path, Path, subprocess.CompletedProcess[str]]
) -> None:
    from harmony.repro.runner import train_method

    suite = load_suite_text(tmp_path, MICRO_SUITE)
    run_dir = tmp_path / "runs" / "clip-tiny-test"
    shutil.copytree(micro_repro[1] / "runs" / "clip-tiny-test", run_dir)  # trained by the micro suite: 3 steps
    assert train_method(suite, "clip-tiny-test", run_dir, echo=False)["steps"] == 3
    longer = load_suite_text(tmp_path, MICRO_SUITE.replace("train.max_steps=3", "train.max_steps=4"))
    done = train_method(longer, "clip-tiny-test", run_dir, echo=False)
    assert done["steps"] == 4 and done["overrides"] == longer.train.overrides
    log = (run_dir / "train.log").read_text()
    assert "resuming" not in log, "the old run (other settings) was not continued"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_repro_to_an_unwritable_out_is_one_line(tmp_path: Path, cli: Cli) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = cli("repro", "--suite", "demo", "--out", str(blocker / "out"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "which is a file" in proc.stderr


def test_demo_prints_its_elapsed_time(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from harmony.repro import cli

    monkeypatch.setattr(cli, "cmd_repro", lambda args: 0)
    assert cli.cmd_demo(argparse.Namespace(out="runs/demo", device="cpu")) == 0
    assert re.search(r"^\[demo\] done in \d+s$", capsys.readouterr().out, re.MULTILINE)


def load_suite_text(folder: Path, text: str) -> Suite:
    path = folder / "suite.yaml"
    path.write_text(text)
    return load_suite(str(path))


def test_ctrl_c_during_repro_lets_the_training_save(tmp_path: Path) -> None:
    import os
    import signal
    import sys

    from harmony.core import checkpoint as ckpt
    from tests.conftest import REPO

    suite_file = tmp_path / "long.yaml"
    suite_file.write_text(MICRO_SUITE.replace("train.max_steps=3", "train.max_steps=400"))
    out = tmp_path / "repro"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harmony.cli", "repro", "--suite", str(suite_file), "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches the whole group
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if " step 4/400 " in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().endswith("interrupted"), err
    run = out / "runs" / "clip-tiny-test"
    assert "stopped by SIGINT" in (run / "train.log").read_text()
    assert 4 <= ckpt.load(run / "checkpoints" / "last.pt")["step"] < 400
