"""Evaluation reads every image file training reads (GIF and TIFF included) and names the files it leaves out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmony.data.convert import folder_pairs
from harmony.eval.datasets import image_folder


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
