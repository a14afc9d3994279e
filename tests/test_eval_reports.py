"""What a user comparing our evaluation with other tools needs: every image file training reads is read (GIF
and TIFF included) and the files left out are named; zero-shot reports per-class recall as CLIP_benchmark does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmony.data.convert import folder_pairs
from harmony.eval.datasets import image_folder
from harmony.eval.metrics import per_class_recall
from tests.conftest import Cli


def test_class_folders_read_gif_and_tiff_and_name_what_they_leave_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        Image.new("P", (20, 16), 3).save(tmp_path / label / "a.gif")
        Image.fromarray(np.full((16, 20), 40000, dtype=np.uint16)).save(tmp_path / label / "b.tif")
        Image.new("RGB", (20, 16), (9, 9, 9)).save(tmp_path / label / "c.TIFF")
        (tmp_path / label / "notes.txt").write_text("not an image")
        (tmp_path / label / "d.heic").write_bytes(b"\0" * 16)
    data = image_folder(tmp_path)
    assert data.size == 6 and data.class_names == ["cat", "dog"]
    assert all(data.get(i)[0].size == (20, 16) for i in range(data.size))
    err = capsys.readouterr().err
    assert "4 file(s)" in err and ".heic: 2" in err and ".txt: 2" in err and len(err.strip().splitlines()) == 1
    # the converter that makes training shards from a folder reads the same files
    assert len(folder_pairs(tmp_path, "a photo of a {label}")) == 6


def test_per_class_recall_hand_computed() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.1, 0.8, 0.1]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert per_class_recall(logits, labels) == [0.5, pytest.approx(1 / 3), None]  # class 2 has no image


def test_zeroshot_json_has_per_class_recall(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    out = tmp_path / "zs.json"
    args = ["eval", "zeroshot", "--checkpoint", str(clip_checkpoint), "--data", "builtin:shapes:val"]
    assert cli(*args, "--out", str(out), "--workers", "0").returncode == 0
    result = json.loads(out.read_text())
    per_class = result["per_class"]
    assert list(per_class) == result["dataset"]["class_names"]
    assert sum(c["images"] for c in per_class.values()) == result["dataset"]["num_images"]
    recalls = [c["recall"] for c in per_class.values() if c["recall"] is not None]
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(sum(recalls) / len(recalls))
    weighted = sum(c["recall"] * c["images"] for c in per_class.values() if c["images"])
    assert weighted / result["dataset"]["num_images"] == pytest.approx(result["metrics"]["top1"])
