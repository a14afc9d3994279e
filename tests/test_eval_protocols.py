"""Protocol building blocks (in process): settings, linear-probe sweep, classifier and pyramid
construction, and the dataset formats users bring (class folders, ADE20K layout, COCO json, CSV)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from harmony.data.shapes import ShapesDataset
from harmony.eval.captions import open_captioned
from harmony.eval.datasets import default_train_spec, open_labelled
from harmony.eval.detdata import coco_ground_truth, open_detection
from harmony.eval.finetune import classifier_from
from harmony.eval.knn import KNN_FULL, KnnSettings
from harmony.eval.linear import HeadSpec, train_heads
from harmony.eval.pyramid import SimpleFeaturePyramid, pyramid_layers
from harmony.eval.segdata import IGNORE, open_segmentation
from harmony.eval.settings import resolve
from harmony.loading import load
from tests.conftest import tiny


def test_settings_pick_builtin_or_full_and_apply_overrides() -> None:
    assert resolve(KnnSettings(), KNN_FULL, "builtin:shapes:val", {}).max_train == 5000
    assert resolve(KnnSettings(), KNN_FULL, "/data/imagenet/val", {}).max_train == 0
    s = resolve(KnnSettings(), KNN_FULL, "builtin:shapes:val", {"ks": "5,7", "temperature": None})
    assert s.ks == (5, 7) and s.temperature == 0.07
    assert resolve(KnnSettings(), KNN_FULL, "x", {"ks": 3}).ks == (3,)
    with pytest.raises(TypeError, match="unknown setting"):
        resolve(KnnSettings(), KNN_FULL, "x", {"epochs": 3})


def test_linear_heads_each_step_with_their_own_lr() -> None:
    """One update of a bank of heads equals plain SGD with each head's own lr (x batch / 256)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    specs = [HeadSpec(1, "cls", 0.5), HeadSpec(1, "cls", 0.05)]
    torch.manual_seed(7)
    w0 = torch.randn(2, 6, 3) * 0.01  # the bank's initial weights under the same seed
    [(bank, members)] = train_heads({(1, "cls"): x}, y, specs, 3, epochs=1, batch_size=32, seed=7)
    assert members == specs
    for h, spec in enumerate(specs):
        w = w0[h].clone().requires_grad_(True)
        F.cross_entropy(x @ w, y).backward()
        assert w.grad is not None
        expected = w0[h] - spec.lr * 32 / 256 * w.grad
        assert torch.allclose(bank.weight[h].detach(), expected, atol=1e-6)


def test_linear_heads_fit_separable_features() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=gen)
    x = F.one_hot(y, 4).float() * 3 + 0.1 * torch.randn(400, 4, generator=gen)
    specs = [HeadSpec(1, "cls", lr) for lr in (1e-5, 1.0)]
    [(bank, _)] = train_heads({(1, "cls"): x}, y, specs, 4, epochs=20, batch_size=64)
    accuracy = (bank(x).argmax(-1) == y).float().mean(dim=1)
    assert accuracy[1] == 1.0 and accuracy[0] < accuracy[1]


def test_classifier_and_pyramid_from_a_tower() -> None:
    from harmony.factory import build_pair
    from harmony.models.tokenizer import CaptionTokenizer

    cfg = tiny("clip-tiny-test")
    visual = build_pair(cfg, CaptionTokenizer(cfg.model.context_length), with_text=False, use_mask_token=False).visual
    visual.eval()
    images = torch.randn(2, 3, 32, 32)
    clf = classifier_from(visual, 5, drop_path=0.0, pool="token").eval()
    with torch.no_grad():
        assert torch.allclose(clf.forward_features(images), visual(images), atol=1e-5)
        assert clf(images).shape == (2, 5)
    assert pyramid_layers(12) == [3, 5, 7, 11]
    pyramid = SimpleFeaturePyramid(visual, out_channels=8, extra_level=True).eval()
    with torch.no_grad():
        shapes = {k: tuple(v.shape) for k, v in pyramid(images).items()}
    assert shapes == {
        "0": (2, 8, 16, 16),
        "1": (2, 8, 8, 8),
        "2": (2, 8, 4, 4),
        "3": (2, 8, 2, 2),
        "pool": (2, 8, 1, 1),
    }
    assert pyramid.vit is not visual.vit and all(p.requires_grad for p in pyramid.vit.parameters())


@pytest.fixture(scope="module")
def shapes() -> ShapesDataset:
    return ShapesDataset("val", 6, 32)


def test_ade20k_layout_with_reduce_zero_label(tmp_path: Path, shapes: ShapesDataset) -> None:
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        for i in range(3):
            s = shapes[i]
            s.image.save(tmp_path / "images" / split / f"im{i}.jpg")
            Image.fromarray(s.semantic + 1).save(tmp_path / "annotations" / split / f"im{i}.png")  # 0 = "other"
    spec = str(tmp_path / "images" / "validation")
    assert default_train_spec(spec) == str(tmp_path / "images" / "training")
    data = open_segmentation(spec, tiny("clip-tiny-test"), reduce_zero_label=True)
    image, mask = data.get(0)
    assert image.size == (32, 32) and np.array_equal(mask, shapes[0].semantic)
    assert len(data.class_names) == int(max(shapes[i].semantic.max() for i in range(3))) + 1
    raw = open_segmentation(spec, tiny("clip-tiny-test"), reduce_zero_label=False).get(0)[1]
    assert IGNORE not in raw and raw.min() >= 1


def test_coco_json_detection_round_trip(tmp_path: Path, shapes: ShapesDataset) -> None:
    cfg = tiny("clip-tiny-test")
    builtin = open_detection("builtin:shapes:val", cfg)
    targets, sizes = [], []
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    for i in range(3):
        image, target = builtin.get(i)
        image.save(tmp_path / "val2017" / f"{i}.png")
        targets.append(target)
        sizes.append((32, 32))
    truth = coco_ground_truth(targets, sizes, builtin.class_names)
    for im in truth["images"]:
        im["file_name"] = f"{im['id']}.png"
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(truth))
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(truth))
    assert default_train_spec(str(path)) == str(tmp_path / "annotations" / "instances_train2017.json")
    data = open_detection(str(path), cfg)  # images found in ../val2017
    assert data.class_names == builtin.class_names
    image, target = data.get(0)
    assert image.size == (32, 32)
    assert torch.allclose(target["boxes"], targets[0]["boxes"])
    assert torch.equal(target["labels"], targets[0]["labels"])
    assert torch.equal(target["masks"], targets[0]["masks"])


def test_captioned_formats(tmp_path: Path, shapes: ShapesDataset) -> None:
    cfg = tiny("clip-tiny-test")
    builtin = open_captioned("builtin:shapes:val", cfg, per_image=3)
    _, captions = builtin.get(1)
    assert len(captions) == 3 and len(set(captions)) > 1 and builtin.get(1)[1] == captions
    for i in range(2):
        shapes[i].image.save(tmp_path / f"{i}.png")
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        w.writerows([["0.png", "a"], ["1.png", "b"], ["0.png", "c"]])
    table = open_captioned(str(tmp_path / "pairs.csv"), cfg)
    assert len(table) == 2 and table.get(0)[1] == ["a", "c"]
    karpathy = {
        "images": [
            {"filename": "0.png", "split": "test", "sentences": [{"raw": "x"}, {"raw": "y"}]},
            {"filename": "1.png", "split": "train", "sentences": [{"raw": "z"}]},
        ]
    }
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    assert open_captioned(str(tmp_path / "karpathy.json"), cfg).get(0)[1] == ["x", "y"]
    coco = {"images": [{"id": 5, "file_name": "1.png"}], "annotations": [{"image_id": 5, "caption": "q"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert len(open_captioned(str(tmp_path / "captions.json"), cfg)) == 1


def test_class_folder_needs_a_train_split(tmp_path: Path, clip_checkpoint: Path) -> None:
    from harmony.data.sources import DataError

    (tmp_path / "val" / "circle").mkdir(parents=True)
    ShapesDataset("val", 1, 32)[0].image.save(tmp_path / "val" / "circle" / "0.png")
    assert open_labelled(str(tmp_path / "val"), load(clip_checkpoint).config).class_names == ["circle"]
    with pytest.raises(DataError, match="--train"):
        default_train_spec(str(tmp_path / "val"))
