from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harmony.core.distributed import DistInfo
from harmony.data.loader import EpochSampler
from harmony.data.shapes import CLASS_NAMES, COLORS, ShapesDataset
from harmony.data.shards import write_shapes
from harmony.data.sources import Layout, ShardSource, decode_sample
from harmony.train.loop import train
from tests.conftest import run_cli, tiny


def test_shapes_are_deterministic_and_splits_differ() -> None:
    a, b = ShapesDataset("train", 10, 64, seed=3), ShapesDataset("train", 10, 64, seed=3)
    for i in range(10):
        sa, sb = a[i], b[i]
        assert sa.caption == sb.caption and np.array_equal(np.asarray(sa.image), np.asarray(sb.image))
    val = ShapesDataset("val", 10, 64, seed=3)
    assert [val[i].caption for i in range(10)] != [a[i].caption for i in range(10)]
    assert len(CLASS_NAMES) >= 8 and len(COLORS) >= 8


def test_labels_masks_and_boxes_agree() -> None:
    ds = ShapesDataset("train", 60, 64)
    mismatched = 0
    for i in range(60):
        s = ds[i]
        assert s.image.size == (64, 64) and s.semantic.shape == (64, 64)
        assert 1 <= len(s.boxes) <= 3 and len(s.boxes) == len(s.classes)
        for inst, (box, cls) in enumerate(zip(s.boxes, s.classes), start=1):
            ys, xs = np.nonzero(s.instances == inst)
            if len(xs):
                assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                assert (s.semantic[s.instances == inst] == cls).all()
        areas = [(s.instances == k).sum() for k in range(1, len(s.classes) + 1)]
        assert s.classes[int(np.argmax(areas))] - 1 == s.label
        mismatched += not s.caption_matches
    assert 1 <= mismatched <= 15  # about 10 %


def test_every_shape_is_darker_than_its_background_and_colour_labels_follow_the_primary() -> None:
    from harmony.eval.datasets import open_labelled
    from harmony.presets import build_config

    ds = ShapesDataset("val", 40, 64)
    luminance = np.array([0.299, 0.587, 0.114])
    for i in range(40):
        s = ds[i]
        pixels = np.asarray(s.image, dtype=np.float32) @ luminance
        assert pixels[s.instances > 0].mean() < np.percentile(pixels[s.instances == 0], 5)
        primary = max(range(len(s.objects)), key=lambda k: float(s.objects[k]["area"]))  # type: ignore[arg-type]
        assert list(COLORS)[s.color] == s.objects[primary]["color"]
        assert CLASS_NAMES[s.label] == s.objects[primary]["shape"]
    cfg = build_config("clip-tiny-test", ["data.builtin.num_val=40"])
    by_color = open_labelled("builtin:shapes:val:color", cfg)
    assert by_color.class_names == list(COLORS)
    small = ShapesDataset("val", 40, cfg.data.builtin.image_size)
    assert [by_color.get(i)[1] for i in range(40)] == [small[i].color for i in range(40)]


def test_synth_shards_round_trip(tmp_path: Path) -> None:
    proc = run_cli(
        "data",
        "synth",
        "--out",
        str(tmp_path),
        "--num",
        "25",
        "--shard-size",
        "10",
        "--image-size",
        "32",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    shards = sorted(tmp_path.glob("*.tar"))
    assert [p.name for p in shards] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert "train-0000000.png" in names and "train-0000000.txt" in names and "train-0000000.json" in names
        meta = json.loads(tar.extractfile("train-0000000.json").read())  # type: ignore[union-attr]
        seg = np.asarray(Image.open(io.BytesIO(tar.extractfile("train-0000000.seg.png").read())))  # type: ignore[union-attr]
    reference = ShapesDataset("train", 25, 32)[0]
    assert meta["label"] == reference.label and np.array_equal(seg, reference.semantic)
    source = ShardSource(str(tmp_path))
    assert source.epoch_size == 25
    stream = source.raw_samples(seed=0, epoch=0, layout=Layout(), part=0)
    seen = {decode_sample(next(stream)).key for _ in range(25)}
    assert len(seen) == 25
    sample = decode_sample(next(iter(source.raw_samples(0, 0, Layout(), 0))))
    assert sample.image.size == (32, 32) and sample.caption


def test_training_reads_shards_through_the_user_path(tmp_path: Path) -> None:
    write_shapes(ShapesDataset("train", 40, 32), tmp_path / "shards", per_shard=10, progress=False)
    spec = str(tmp_path / "shards" / "train-{00000..00003}.tar")
    result = train(
        tiny("clip-tiny-test", f"data_spec={spec}", "train.max_steps=6", "train.log_every=3"),
        tmp_path / "run",
        progress=False,
    )
    assert result.steps == 6 and result.last_metrics["loss"] > 0


def test_sampler_splits_global_batches_over_ranks() -> None:
    one = list(EpochSampler(40, 8, DistInfo(0, 1), seed=1))
    ranks = [list(EpochSampler(40, 8, DistInfo(r, 2), seed=1)) for r in range(2)]
    for step in range(5):
        merged = ranks[0][step * 4 : step * 4 + 4] + ranks[1][step * 4 : step * 4 + 4]
        assert merged == one[step * 8 : step * 8 + 8]
    assert sorted(s.index for s in one) == list(range(40)) and [s.position for s in one] == list(range(40))
    assert list(EpochSampler(40, 8, DistInfo(0, 1), seed=2)) != one


def test_view_maker_outputs(tmp_path: Path) -> None:
    from harmony.data.views import ViewMaker, collate
    from harmony.models.tokenizer import CaptionTokenizer
    from harmony.train.task import PretrainTask

    cfg = tiny("harmony-tiny-test")
    tok = CaptionTokenizer(cfg.model.context_length)
    maker = ViewMaker(cfg, PretrainTask(cfg, tok).needs, tok, 8)
    ds = ShapesDataset("train", 4, 32)
    views = [maker(ds[i].image, ds[i].caption, seed=i) for i in range(4)]
    again = maker(ds[0].image, ds[0].caption, seed=0)
    assert all(torch.equal(views[0][k], again[k]) for k in views[0])
    batch = collate(views)
    assert batch["global"].shape == (2, 4, 3, 32, 32) and batch["global"].dtype == torch.uint8
    assert batch["local"].shape == (2, 4, 3, 16, 16)
    assert batch["ibot_mask"].shape == (2, 4, 4, 4)
    assert batch["mae_keep"].shape == (2, 4, 4) and batch["mae_remove"].shape == (2, 4, 12)
    masked = batch["text_mask"]
    assert (batch["text_masked"][masked] == tok.mask_id).all()
    assert (batch["text_masked"][~masked] == batch["text"][~masked]).all()
    assert not (masked & ~tok.word_positions(batch["text"])).any()
