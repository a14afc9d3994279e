"""Evaluation metrics against hand-computed cases, perfect and random predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harmony.eval.detdata import coco_ground_truth
from harmony.eval.metrics import (
    coco_ap,
    confusion_matrix,
    knn_scores,
    mass_jaccard,
    retrieval_recall,
    segmentation_scores,
    topk_accuracy,
    topk_precision,
)


def test_retrieval_recall_hand_computed() -> None:
    # 3 images; texts 0,1 -> image 0, text 2 -> image 1, text 3 -> image 2
    owners = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.0],  # image 0: best text 1 (its own) -> hit at 1
            [0.8, 0.0, 0.7, 0.1],  # image 1: text 0 first, its text 2 second -> hit at 2
            [0.3, 0.2, 0.1, 0.05],  # image 2: its text 3 is last -> hit at 4 only
        ]
    )
    r = retrieval_recall(sim, owners, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    # columns: t0 ranks images 1, 2, 0 (miss); t1 and t2 find theirs first; t3 ranks 1, 2, 0 (hit at 2)
    assert r["t2i_r1"] == pytest.approx(2 / 4)
    assert r["t2i_r2"] == pytest.approx(3 / 4)


def test_retrieval_recall_perfect_and_random() -> None:
    images = F.normalize(torch.randn(50, 16), dim=-1)
    owners = torch.arange(50).repeat_interleave(3)  # three captions per image
    perfect = retrieval_recall(images @ images[owners].t(), owners)
    assert all(v == 1.0 for v in perfect.values())
    gen = torch.Generator().manual_seed(0)
    n = 2000
    random = retrieval_recall(torch.rand(n, n, generator=gen), torch.arange(n), ks=(10, 100))
    for key, k in (("i2t_r10", 10), ("t2i_r10", 10), ("i2t_r100", 100), ("t2i_r100", 100)):
        assert random[key] == pytest.approx(k / n, abs=0.3 * k / n + 0.004)


def test_knn_votes_weighted_by_exp_similarity() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[0.8, 0.6]])  # similarities 0.8, 0.6, 0.96
    votes = knn_scores(train, labels, query, k=2, temperature=0.1, num_classes=2)
    # the two nearest: train 2 (0.96, class 1) and train 0 (0.8, class 0)
    assert votes[0, 0].item() == pytest.approx(math.exp(8.0), rel=1e-5)
    assert votes[0, 1].item() == pytest.approx(math.exp(9.6), rel=1e-5)


def test_knn_perfect_and_random_embeddings() -> None:
    gen = torch.Generator().manual_seed(0)
    classes = 4
    labels = torch.randint(0, classes, (800,), generator=gen)
    perfect = F.normalize(F.one_hot(labels, classes).float() + 0.01 * torch.randn(800, classes, generator=gen), dim=-1)
    votes = knn_scores(perfect[:600], labels[:600], perfect[600:], k=20, temperature=0.07, num_classes=classes)
    assert topk_accuracy(votes, labels[600:], ks=(1,))["top1"] == 1.0
    noise = F.normalize(torch.randn(4000, 32, generator=gen), dim=-1)
    noise_labels = torch.randint(0, classes, (4000,), generator=gen)
    votes = knn_scores(noise[:2000], noise_labels[:2000], noise[2000:], k=20, temperature=0.07, num_classes=classes)
    assert topk_accuracy(votes, noise_labels[2000:], ks=(1,))["top1"] == pytest.approx(1 / classes, abs=0.04)


def test_segmentation_scores_hand_computed() -> None:
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(pred, target, num_classes=4)
    assert conf.sum() == 5  # the 255 pixel is ignored
    scores = segmentation_scores(conf)
    # class 0: tp 1, gt 2, pred 1 -> IoU 1/2; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: 1; class 3 absent
    assert scores["mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert scores["mAcc"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert scores["pixel_acc"] == pytest.approx(4 / 5)


def test_segmentation_perfect_and_random() -> None:
    gen = torch.Generator().manual_seed(0)
    classes = 4
    target = torch.randint(0, classes, (400, 400), generator=gen)
    assert segmentation_scores(confusion_matrix(target, target, classes))["mIoU"] == 1.0
    random = segmentation_scores(
        confusion_matrix(torch.randint(0, classes, (400, 400), generator=gen), target, classes)
    )
    # uniform guesses: IoU = (1/C^2) / (2/C - 1/C^2) = 1 / (2C - 1)
    assert random["mIoU"] == pytest.approx(1 / (2 * classes - 1), abs=0.01)
    assert random["pixel_acc"] == pytest.approx(1 / classes, abs=0.01)


def _box_target(boxes: list[list[float]], labels: list[int], size: int = 32) -> dict[str, torch.Tensor]:
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[int(y0) : int(y1), int(x0) : int(x1)] = 1
    return {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "masks": masks}


def _detections(target: dict[str, torch.Tensor], scores: list[float], labels: list[int]) -> tuple[list, list]:
    truth = coco_ground_truth([target], [(32, 32)], ["a", "b"])
    boxes = [
        {"image_id": 0, "category_id": label, "score": score, "bbox": ann["bbox"]}
        for ann, score, label in zip(truth["annotations"], scores, labels)
    ]
    segms = [
        {"image_id": 0, "category_id": label, "score": score, "segmentation": ann["segmentation"]}
        for ann, score, label in zip(truth["annotations"], scores, labels)
    ]
    return boxes, segms


def test_coco_ap_perfect_half_and_wrong() -> None:
    target = _box_target([[2.0, 2.0, 12.0, 12.0], [16.0, 16.0, 30.0, 28.0]], [1, 2])
    truth = coco_ground_truth([target], [(32, 32)], ["a", "b"])
    boxes, segms = _detections(target, [0.9, 0.8], [1, 2])
    for kind, dets in (("bbox", boxes), ("segm", segms)):
        assert coco_ap(truth, dets, kind) == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
        # wrong class on both objects: no true positive anywhere
        wrong = [{**d, "category_id": 3 - d["category_id"]} for d in dets]
        assert coco_ap(truth, wrong, kind)["AP"] == 0.0
    # one class, two objects, only one found: precision 1 up to recall 0.5 -> 51 of 101 recall points
    single = _box_target([[2.0, 2.0, 12.0, 12.0], [16.0, 16.0, 30.0, 28.0]], [1, 1])
    truth1 = coco_ground_truth([single], [(32, 32)], ["a", "b"])
    half, _ = _detections(single, [0.9], [1])
    assert coco_ap(truth1, half, "bbox")["AP"] == pytest.approx(51 / 101)
    assert coco_ap(truth, [], "bbox")["AP"] == 0.0


def test_mass_jaccard_and_topk_precision() -> None:
    attention = torch.tensor([[0.5, 0.2], [0.2, 0.1]])
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    # 60 % of the mass: 0.5 then the first 0.2 (0.7 >= 0.6): exactly the mask
    assert mass_jaccard(attention, mask, keep=0.6) == pytest.approx(1.0)
    assert mass_jaccard(attention, ~mask, keep=0.6) == pytest.approx(0.0)
    assert mass_jaccard(torch.tensor([[0.7, 0.3], [0.0, 0.0]]), mask, keep=0.6) == pytest.approx(1 / 2)
    score = torch.tensor([[0.9, 0.1], [0.8, 0.0]])
    assert topk_precision(score, mask) == pytest.approx(1 / 2)  # top-2: (0,0) in, (1,0) out
    assert math.isnan(topk_precision(score, torch.zeros(2, 2, dtype=torch.bool)))


def test_confusion_matrix_counts_rows_as_truth() -> None:
    conf = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 0]), num_classes=2)
    assert conf.tolist() == [[1, 1], [0, 1]]
    assert np.trace(conf.numpy()) == 2
