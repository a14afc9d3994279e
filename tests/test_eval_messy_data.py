"""`harmony eval` on the files a real user's evaluation folders and tables hold: 16-bit and CMYK images,
hidden files, unicode and empty class folders, Excel CSVs, URL rows, ADE/COCO sets with broken members; each is
read as meant or skipped and counted, never a traceback."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmony.data.errors import DataError, SampleError
from harmony.data.shapes import ShapesDataset
from harmony.eval.captions import open_captioned
from harmony.eval.datasets import open_labelled
from harmony.eval.detdata import open_detection
from harmony.eval.images import read_image
from harmony.eval.segment import run_segment
from harmony.loading import load
from tests.conftest import tiny


def test_16_bit_greyscale_keeps_its_picture(tmp_path: Path) -> None:
    """PIL's convert('RGB') clips 16-bit values: the whole image came out white."""
    ramp = (np.arange(32 * 32, dtype=np.int32).reshape(32, 32) * 64).astype(np.int32)
    Image.fromarray(ramp).convert("I;16").save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pixels = np.asarray(read_image(tmp_path / "deep.png"))
    assert pixels.shape == (32, 32, 3) and pixels.min() == 0 and 120 < pixels.mean() < 136
    assert pixels[0, 0, 0] < pixels[16, 16, 0] < pixels[31, 31, 0]


def test_cmyk_jpeg_reads_as_its_colours(tmp_path: Path) -> None:
    image = ShapesDataset("val", 1, 32)[0].image
    image.convert("CMYK").save(tmp_path / "print.jpg", quality=95)
    diff = np.abs(np.asarray(read_image(tmp_path / "print.jpg"), dtype=int) - np.asarray(image, dtype=int))
    assert diff.mean() < 6


def test_a_class_folder_as_users_have_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Hidden files and folders were classes or images; an empty class folder went unnoticed."""
    cfg = tiny("clip-tiny-test")
    image = ShapesDataset("val", 1, 32)[0].image
    for name in ("café_crème", "日本語", "empty"):
        (tmp_path / name).mkdir()
    image.save(tmp_path / "café_crème" / "a.png")
    (tmp_path / "日本語" / "nested" / "deeper").mkdir(parents=True)
    image.save(tmp_path / "日本語" / "nested" / "deeper" / "b.JPG", format="JPEG")
    (tmp_path / "日本語" / "notes.txt").write_text("not an image")
    (tmp_path / "日本語" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "日本語" / "._b.JPG").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "README.md").write_text("my data")
    (tmp_path / "empty" / ".hidden").mkdir()
    image.save(tmp_path / "empty" / ".hidden" / "c.png")
    data = open_labelled(str(tmp_path), cfg)
    assert data.class_names == ["café_crème", "empty", "日本語"] and len(data) == 2
    assert [data.get(i)[1] for i in range(2)] == [0, 2]
    assert "class folder(s) empty of" in capsys.readouterr().err
    (tmp_path / "café_crème" / "zero.png").write_bytes(b"")
    data = open_labelled(str(tmp_path), cfg)
    with pytest.raises(SampleError, match=r"zero.png': empty image file \(0 bytes\)"):
        data.get(1)


def test_retrieval_csv_from_excel_and_url_rows(tmp_path: Path) -> None:
    """Excel's 'CSV UTF-8' starts with a BOM: the first column was '\\ufefffilepath' and not found."""
    cfg = tiny("clip-tiny-test")
    ShapesDataset("val", 1, 32)[0].image.save(tmp_path / "a b.png")
    with (tmp_path / "excel.csv").open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(["filepath", "caption"])
        writer.writerow(["a b.png", 'a "quoted", comma caption'])
        writer.writerow(["https://example.com/x.jpg", "a web image"])
    data = open_captioned(str(tmp_path / "excel.csv"), cfg)
    assert len(data) == 1 and data.get(0)[1] == ['a "quoted", comma caption']
    assert data.skipped["count"] == 1 and "is a URL (not downloaded)" in data.skipped["examples"][0]
    (tmp_path / "urls.csv").write_text("filepath,caption\nhttp://x/1.jpg,one\n")
    with pytest.raises(DataError, match=r"1 rows skipped; first: .* is a URL"):
        open_captioned(str(tmp_path / "urls.csv"), cfg)


def ade_folder(root: Path) -> Path:
    """ADE20K layout with 6 good pairs per split, a zero-byte image and a colour-coded (RGB) mask."""
    ds = ShapesDataset("val", 12, 32)
    for split, first in (("training", 0), ("validation", 6)):
        images, masks = root / "images" / split, root / "annotations" / split
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(first, first + 6):
            ds[i].image.save(images / f"{i}.jpg")
            Image.fromarray(ds[i].semantic.astype(np.uint8)).save(masks / f"{i}.png")
        (images / "zero.jpg").write_bytes(b"")
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "zero.png")
        ds[0].image.save(images / "rgbmask.jpg")
        Image.new("RGB", (32, 32), (10, 20, 30)).save(masks / "rgbmask.png")
    return root / "images" / "validation"


def test_segmentation_folder_with_broken_pairs_is_scored_on_the_rest(tmp_path: Path, clip_checkpoint: Path) -> None:
    """A zero-byte image or an RGB mask ended the run with a traceback."""
    result = run_segment(
        load(clip_checkpoint), str(ade_folder(tmp_path)), torch.device("cpu"), num_workers=0,
        protocols=("linear",), linear_steps=2, batch_size=4, crop_size=32, max_train=0, max_eval=0,
    )  # fmt: skip
    dataset = result["dataset"]
    assert dataset["num_images"] == 6 and dataset["skipped"]["reasons"]["image"] >= 2
    assert any("3 dimensions" in e for e in dataset["skipped"]["examples"])
    assert 0.0 <= result["metrics"]["linear_mIoU"] <= 1.0


def test_coco_detection_json_without_masks_or_with_a_missing_image(tmp_path: Path) -> None:
    """Box-only annotations crashed Mask R-CNN training with a segmentation fault."""
    cfg = tiny("clip-tiny-test")
    (tmp_path / "val2017").mkdir()
    ShapesDataset("val", 1, 32)[0].image.save(tmp_path / "val2017" / "0.jpg")
    images = [{"id": 0, "file_name": "0.jpg", "height": 32, "width": 32}]
    images.append({"id": 1, "file_name": "missing.jpg", "height": 32, "width": 32})
    annotations = [
        {"id": i + 1, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}
        for i in range(2)
    ]
    spec = tmp_path / "annotations" / "instances_val2017.json"
    spec.parent.mkdir()
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    spec.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"2 annotation\(s\) without 'segmentation'"):
        open_detection(str(spec), cfg)
    for a in annotations:
        a["segmentation"] = [[2, 2, 12, 2, 12, 12, 2, 12]]
    spec.write_text(json.dumps(coco))
    data = open_detection(str(spec), cfg)
    assert data.get(0)[1]["masks"].shape == (1, 32, 32)
    with pytest.raises(SampleError, match=r"missing\.jpg"):
        data.get(1)


def test_feature_cache_notices_an_edited_folder(tmp_path: Path, clip_checkpoint: Path) -> None:
    """Moving images to another class folder (same count) gave the old features and labels from the cache."""
    from harmony.eval.features import cached_summaries

    pretrained = load(clip_checkpoint)
    ds = ShapesDataset("val", 6, 32)
    for i in range(6):
        (tmp_path / "val" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        ds[i].image.save(tmp_path / "val" / "ab"[i % 2] / f"{i}.png")

    def labels() -> list[int]:
        data = open_labelled(str(tmp_path / "val"), pretrained.config)
        return cached_summaries(pretrained, data, torch.device("cpu"), tmp_path / "cache", num_workers=0)[1].tolist()

    assert labels() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "val" / "a" / "0.png").rename(tmp_path / "val" / "b" / "0.png")  # still 6 images
    assert labels() == [0, 0, 1, 1, 1, 1] and len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_train_and_eval_folders_with_different_classes_are_named(tmp_path: Path, clip_checkpoint: Path) -> None:
    from harmony.eval.knn import run_knn
    from harmony.eval.linear import run_linear

    image = ShapesDataset("val", 1, 32)[0].image
    for folder in ("train/cat", "train/dog", "val/cat", "val/Dog"):
        (tmp_path / folder).mkdir(parents=True)
        image.save(tmp_path / folder / "0.png")
    pretrained, cpu = load(clip_checkpoint), torch.device("cpu")
    with pytest.raises(ValueError, match=r"only in training \['dog'\], only in evaluation \['Dog'\]"):
        run_knn(pretrained, str(tmp_path / "val"), cpu, cache_dir=tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="different classes"):  # the linear probe did not check at all
        run_linear(pretrained, str(tmp_path / "val"), cpu, cache_dir=tmp_path, num_workers=0)
