from __future__ import annotations

import json
from pathlib import Path

import torch

from harmony.eval.metrics import topk_accuracy
from harmony.loading import load
from tests.conftest import Cli, run_cli


def test_topk_accuracy_hand_computed() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 1, 1, 0])
    acc = topk_accuracy(logits, labels, ks=(1, 2))
    assert acc["top1"] == 0.5  # rows 0 and 2
    assert acc["top2"] == 0.75  # row 1 has its label second; row 3 has it third


def test_zeroshot_cli_end_to_end(tmp_path: Path, clip_checkpoint: Path) -> None:
    out = tmp_path / "zs.json"
    proc = run_cli(
        "eval",
        "zeroshot",
        "--checkpoint",
        str(clip_checkpoint),
        "--data",
        "builtin:shapes:val",
        "--out",
        str(out),
        "--workers",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot" and result["dataset"]["num_images"] == 32
    assert 0.0 <= result["metrics"]["top1"] <= result["metrics"]["top5"] <= 1.0
    assert "top1" in proc.stdout


def test_zeroshot_on_an_image_folder(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    from harmony.data.shapes import ShapesDataset

    ds = ShapesDataset("val", 12, 32)
    for i in range(12):
        s = ds[i]
        folder = tmp_path / "images" / ds.class_names[s.label]
        folder.mkdir(parents=True, exist_ok=True)
        s.image.save(folder / f"{i}.png")
    proc = cli(
        "eval", "zeroshot", "--checkpoint", str(clip_checkpoint), "--data", str(tmp_path / "images"), "--workers", "0"
    )
    assert proc.returncode == 0, proc.stderr


def test_load_picks_teacher_when_complete(harmony_checkpoint: Path, clip_checkpoint: Path) -> None:
    assert load(clip_checkpoint).weights == "student"
    pretrained = load(harmony_checkpoint)
    assert pretrained.weights == "teacher" and pretrained.model.has_text
    assert load(harmony_checkpoint, weights="student").weights == "student"
