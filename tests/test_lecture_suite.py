"""The `lecture-tiny` suite: every self-supervised method on a tiny ResNet and a tiny ViT, and the DINO and BYOL
ablations, as runs of one preset with other settings (`METHOD@LABEL` entries) reported in the suite's own tables."""

from __future__ import annotations

import re
from pathlib import Path

from harmony.presets import build_config
from harmony.repro.suite import load_suite
from tests.conftest import Cli

RESNET = "timm:resnet-tiny"


def test_every_run_of_the_suite_is_its_methods_preset_with_its_own_settings() -> None:
    suite = load_suite("lecture-tiny")
    runs = suite.presets(with_ablations=False)
    assert len(runs) == 21 and [t.title for t in suite.tables][1].startswith("What prevents collapse")
    for run in runs:
        cfg = build_config(suite.preset_of(run), suite.overrides_for(run))  # every combination is a valid config
        method, _, label = suite.method_of(run).partition("@")
        assert suite.preset_of(run) == f"{method}-tiny"
        assert (cfg.model.vision == RESNET) == (label == "resnet"), run
        assert getattr(cfg.objectives, "ibot" if method == "dino" else method) is not None, run
    dino = {
        label: build_config("dino-tiny", suite.overrides_for(f"dino@{label}-tiny")).objectives.ibot
        for label in ("no-momentum", "mse", "predictor")
    }
    assert (dino["no-momentum"].teacher, dino["mse"].loss, dino["predictor"].predictor) == ("student", "mse", True)
    byol = {
        label: build_config("byol-tiny", suite.overrides_for(f"byol@{label}-tiny")).objectives.byol.norm
        for label in ("no-bn", "gn-ws")
    }
    assert byol == {"no-bn": "none", "gn-ws": "gn_ws"}
    listed = {m for table in suite.tables for m in table.methods}
    assert listed == set(suite.methods)  # every run is in one of the two tables


def test_a_shrunk_lecture_suite_trains_evaluates_and_reports_both_tables(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "lecture"
    proc = cli(
        "repro", "--suite", "lecture-tiny", "--out", str(out), "--device", "cpu", "--size", "tiny-test",
        "--methods", "dino@resnet,byol@no-bn", "--workers", "0",
        "--train-set", "train.max_steps=2", "train.batch_size=8", "data.num_workers=0",
        "--eval-set", "knn.max_train=64", "linear.epochs=1", "linear.max_train=64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "[repro] dino@resnet-tiny-test step 2/2" in proc.stdout  # progress named by the run, not its preset
    report = (out / "report.md").read_text()
    first, second = report.split("## Methods on a ResNet and on a ViT")[1].split("## What prevents collapse")
    assert re.findall(r"^\| (\S+) \|", first, re.M) == ["method", "dino@resnet-tiny-test"]
    assert re.findall(r"^\| (\S+) \|", second.split("\n\n!")[0], re.M) == [
        "method", "byol@no-bn-tiny-test"
    ]  # fmt: skip
    cnn = (out / "runs" / "dino@resnet-tiny-test" / "config.yaml").read_text()
    assert RESNET in cnn and "norm: none" in (out / "runs" / "byol@no-bn-tiny-test" / "config.yaml").read_text()
    row = next(line for line in first.splitlines() if line.startswith("| dino@resnet-tiny-test |"))
    assert re.fullmatch(r"\| dino@resnet-tiny-test \| (\**[0-9.]+\**) \| (\**[0-9.]+\**) \|", row), row  # both numbers
