"""`harmony data from-csv / from-folder / inspect` and the crop pipeline (plans, colour ops, reduced decode)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmony.config import AugmentConfig
from harmony.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    CropPlan,
    adjust,
    plan_crop,
    render_crop,
    render_crops,
)
from harmony.data.convert import EncodeOptions, folder_pairs, write_shards
from harmony.data.decode import decode_pixels, draft_scale, open_image
from harmony.data.errors import DataError
from harmony.data.inspect import in_order, scan
from harmony.data.sources import ShardSource
from harmony.data.views import view_maker_for
from tests.conftest import Cli, tiny
from tests.test_data_sources import MAX_PIXELS, image_bytes, truncated_jpeg, write_csv


def noise_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A smooth random-colour JPEG (a 16x-upsampled noise image)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    base.resize((width, height), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_from_folder_writes_checked_resized_shards(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "red_fox").mkdir(parents=True)
    (root / "owl").mkdir()
    (root / "red_fox" / "a.jpg").write_bytes(noise_jpeg(120, 80))
    (root / "red_fox" / "a.txt").write_text("a fox in the snow\n")
    (root / "red_fox" / "b.png").write_bytes(image_bytes(1, size=30, fmt="PNG"))
    (root / "owl" / "c.jpg").write_bytes(image_bytes(2, size=30))
    (root / "owl" / "broken.jpg").write_bytes(truncated_jpeg())
    (root / "owl" / "empty.jpg").write_bytes(b"")
    (root / "loose.jpg").write_bytes(image_bytes(3))  # no sidecar, no class folder: no caption
    pairs = folder_pairs(root, "a photo of a {label}.")
    assert [p.name for p in pairs] == [
        "loose.jpg",
        "owl/broken.jpg",
        "owl/c.jpg",
        "owl/empty.jpg",
        "red_fox/a.jpg",
        "red_fox/b.png",
    ]
    report = write_shards(
        pairs, tmp_path / "out", 2, EncodeOptions(resize=32), workers=2, progress=False, shuffle_seed=None
    )
    assert report.samples == 3 and report.skipped == {"image": 2, "caption": 1, "shard": 0}
    assert [p.name for p in report.shards] == ["shard-00000.tar", "shard-00001.tar"]
    with tarfile.open(report.shards[0]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000001.json").read())  # type: ignore[union-attr]
    assert names == [
        "000000000.jpg",
        "000000000.txt",
        "000000000.json",
        "000000001.jpg",
        "000000001.txt",
        "000000001.json",
    ]
    assert meta["source"] == "red_fox/a.jpg" and (meta["width"], meta["height"]) == (48, 32)
    assert (meta["original_width"], meta["original_height"]) == (120, 80)
    result = scan(in_order(ShardSource(str(tmp_path / "out")), MAX_PIXELS), 0, 10)
    assert [s.caption for s in result.samples] == ["a photo of a owl.", "a fox in the snow", "a photo of a red fox."]
    assert result.samples[2].image.format == "PNG" and result.samples[2].image.size == (30, 30)  # copied as is
    with pytest.raises(DataError, match="holds no images"):
        folder_pairs(tmp_path / "out")


def test_from_csv_cli_and_inspect_cli(tmp_path: Path, cli: Cli) -> None:
    path, _ = write_csv(tmp_path)
    proc = cli("data", "from-csv", str(path), "--out", str(tmp_path / "shards"), "--shard-size", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 10 samples to 3 shard(s)" in proc.stdout
    assert "skipped 4 samples (3 unreadable images, 1 missing or empty caption)" in proc.stdout
    sheet, counts = tmp_path / "sheet.png", tmp_path / "counts.json"
    proc = cli(
        "data", "inspect", str(tmp_path / "shards"), "--preset", "harmony-tiny-test", "--out", str(sheet),
        "--samples", "3", "--json", str(counts),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "3 shard(s), 10 samples with an image and a caption file" in proc.stdout
        and "caption length (words)" in proc.stdout
    )
    summary = json.loads(counts.read_text())
    assert summary["usable"] == 10 and summary["skipped"] == {"image": 0, "caption": 0, "shard": 0}
    with Image.open(sheet) as image:
        assert image.width > 4 * 128 and image.height > 3 * 128  # image + 2 global + 2 local tiles per row


def test_plans_are_pure_functions_of_seed_and_size() -> None:
    cfg = AugmentConfig(global_size=32, local_size=16)
    a = [plan_crop(100, 80, 32, (0.3, 1.0), cfg, random.Random(5), 1.0, 0.2) for _ in range(2)]
    assert a[0] == a[1] and a[0].blur_sigma > 0
    plan = a[0]
    top, left, h, w = plan.box
    assert top >= 0 and top + h <= 100 and left >= 0 and left + w <= 80 and 0.3 * 8000 * 0.9 <= h * w <= 8000
    none = AugmentConfig(flip=0, color_jitter=0, grayscale=0)
    plain = plan_crop(100, 80, 32, (0.3, 1.0), none, random.Random(5), 0.0, 0.0)
    assert (plain.flip, plain.jitter, plain.grayscale, plain.blur_sigma, plain.solarize) == (
        False,
        (),
        False,
        0.0,
        False,
    )


def test_colour_ops_follow_torchvision_semantics() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.abs(adjust(img, BRIGHTNESS, 0.5).astype(int) - img // 2).max() <= 1
    flat = adjust(img, CONTRAST, 0.0)
    assert (flat == flat[0, 0, 0]).all()
    gray = adjust(img, SATURATION, 0.0)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.abs(adjust(img, HUE, 0.0).astype(int) - img).mean() < 3
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    cyan = adjust(red, HUE, 0.5)[0, 0]
    assert cyan[0] < 5 and cyan[1] > 250 and cyan[2] > 250
    grey_plan = CropPlan((0, 0, 16, 16), 16, grayscale=True, solarize=True)
    out = render_crop(img, grey_plan)
    assert (out[..., 0] == out[..., 2]).all() and out.max() < 128 + 1


def test_render_crops_stack_channel_planes() -> None:
    img = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    plans = [CropPlan((0, 0, 20, 20), 8, flip=True), CropPlan((5, 3, 30, 25), 8, blur_sigma=1.0)]
    stacked = render_crops(img, plans, (1.0, 1.0))
    assert stacked.shape == (2, 3, 8, 8) and stacked.is_contiguous()
    for i, plan in enumerate(plans):
        assert torch.equal(stacked[i], torch.from_numpy(render_crop(img, plan)).permute(2, 0, 1))


def test_large_jpegs_decode_at_reduced_scale_with_the_same_crops() -> None:
    data = noise_jpeg(800, 640)
    small = [CropPlan((0, 0, 400, 400), 96), CropPlan((100, 100, 300, 500), 96)]
    assert draft_scale(small) == 2 and draft_scale([CropPlan((0, 0, 150, 150), 96)]) == 1 and draft_scale([]) == 1
    reduced, factor = decode_pixels(open_image(data, MAX_PIXELS), small)
    full, one = decode_pixels(open_image(data, MAX_PIXELS), [])
    assert reduced.shape == (320, 400, 3) and factor == (0.5, 0.5) and full.shape == (640, 800, 3) and one == (1, 1)
    for plan in small:
        a, b = render_crop(reduced, plan, factor).astype(int), render_crop(full, plan, one).astype(int)
        assert np.abs(a - b).mean() < 6  # DCT-scaled vs pyramid anti-aliasing: close, not equal


def test_view_maker_decodes_lazily_and_deterministically() -> None:
    cfg = tiny("harmony-tiny-test")
    maker = view_maker_for(cfg)
    data = noise_jpeg(300, 200)
    views = [maker(open_image(data, MAX_PIXELS), "a red square", seed=3) for _ in range(2)]
    assert all(torch.equal(views[0][k], views[1][k]) for k in views[0])
    assert views[0]["global"].shape == (2, 3, 32, 32) and views[0]["local"].shape == (2, 3, 16, 16)
    other = maker(open_image(data, MAX_PIXELS), "a red square", seed=4)
    assert not torch.equal(views[0]["global"], other["global"])


def test_from_folder_without_captions_names_both_ways_to_give_them(tmp_path: Path, cli: Cli) -> None:
    for name in ("red_circle", "blue-square"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        (tmp_path / "imgs" / name / "a.png").write_bytes(image_bytes(1))
    proc = cli("data", "from-folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"), "--no-progress")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "no caption (no .txt beside it; --caption-template 'a photo of a {label}.'" in proc.stderr
