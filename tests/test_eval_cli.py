"""Every `harmony eval` command end to end on the tiny checkpoints and the tiny built-in data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harmony.cli import main
from tests.conftest import Cli

TINY = {
    "linear": ["--epochs", "2"],
    "finetune": ["--epochs", "1", "--batch-size", "16"],
    "segment": ["--linear-steps", "2", "--fpn-steps", "2", "--batch-size", "4", "--max-eval", "8"],
    "detect": ["--epochs", "1", "--batch-size", "2", "--max-train", "4", "--max-eval", "2"],
    "attention": ["--max-eval", "6", "--num-images", "2"],
}
EXPECTED = {
    "zeroshot": ["top1", "top5"],
    "retrieval": ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"],
    "knn": ["k10_top1", "k20_top1"],
    "linear": ["top1", "top5", "heldout_top1"],
    "finetune": ["top1", "top5"],
    "segment": ["linear_mIoU", "linear_pixel_acc", "fpn_mIoU", "fpn_pixel_acc"],
    "detect": ["box_AP", "box_AP50", "mask_AP", "mask_AP75"],
    "attention": ["attn_jaccard", "attn_fg_mass", "text_precision"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(EXPECTED))
def test_each_command(
    task: str,
    tmp_path: Path,
    harmony_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HARMONY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / f"{task}.json"
    args = ["eval", task, "--checkpoint", str(harmony_checkpoint), "--out", str(out), "--workers", "0"]
    args += ["--data", "builtin:shapes:val"]
    assert main([*args, *TINY.get(task, [])]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == task and result["weights"] == "teacher" and result["time_s"] > 0
    assert result["dataset"]["spec"] == "builtin:shapes:val" and "settings" in result
    for name in EXPECTED[task]:
        assert 0.0 <= result["metrics"][name] <= 1.0, name
    printed = capsys.readouterr().out
    assert task in printed and EXPECTED[task][0] in printed
    if task == "attention":
        assert {Path(f).name for f in result["files"]} == {"attention.png", "similarity.png"}
        assert all(Path(f).stat().st_size > 1000 for f in result["files"])
    if task == "knn":  # k above the training set's size is capped and named by the k used
        n = result["dataset"]["num_train"]
        assert result["ks_used"] == list(dict.fromkeys(min(k, n) for k in (10, 20, 100, 200)))
        assert {m for m in result["metrics"] if m.endswith("_top1")} == {f"k{k}_top1" for k in result["ks_used"]}
        # the features are cached: a second run reads them back
        assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2
        assert main([*args, "--ks", "1"]) == 0
        assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2
    if task == "linear":
        assert len(result["sweep"]) == 13 * 2 * 2
        assert max(r["heldout_top1"] for r in result["sweep"]) == result["metrics"]["heldout_top1"]


def test_settings_errors_are_messages(harmony_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "segment", "--checkpoint", str(harmony_checkpoint), "--protocols", "upernet", "--workers", "0"]
    args += ["--data", "builtin:shapes:val"]
    assert main(args) == 2
    assert "unknown segmentation protocol" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_all_compares_checkpoints_in_one_report(
    tmp_path: Path, clip_checkpoint: Path, harmony_checkpoint: Path, cli: Cli
) -> None:
    sets = [
        f"{task}.{flag[2:].replace('-', '_')}={value}"
        for task, f in TINY.items()
        for flag, value in zip(f[::2], f[1::2])
    ]
    proc = cli(
        "eval",
        "all",
        "--checkpoint",
        str(clip_checkpoint),
        "--checkpoint",
        str(harmony_checkpoint),
        "--out",
        str(tmp_path / "suite"),
        "--workers",
        "0",
        "--data",
        "builtin:shapes:val",
        "--tasks",
        "zeroshot,knn,attention",
        *[a for s in sets if s.startswith("attention.") for a in ("--set", s)],
        env={"HARMONY_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "suite" / "report.md").read_text()
    labels = [clip_checkpoint.parent.parent.name, harmony_checkpoint.parent.parent.name]
    assert all(label in report for label in labels) and "knn/k20_top1" in report
    assert (tmp_path / "suite" / "headline.png").exists() and (tmp_path / "suite" / "curves.png").exists()
    for label in labels:
        for task in ("zeroshot", "knn", "attention"):
            assert json.loads((tmp_path / "suite" / label / f"{task}.json").read_text())["task"] == task
        assert f"{label}/maps/attention.png" in report
    assert "| knn/k20_top1 |" in proc.stdout
