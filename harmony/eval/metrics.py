"""Evaluation metrics as small pure functions on tensors (each tested against hand-computed cases)."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest scores, for each k (k capped at #classes)."""
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        hit = (logits.topk(k_eff, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
        out[f"top{k}"] = hit.float().mean().item()
    return out


def per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> list[float | None]:
    """Per class, the fraction of its rows whose top-1 is the class (None for a class without rows): what
    CLIP_benchmark reports as per-class recall, and whose mean is its `mean_per_class_recall`."""
    predicted = logits.argmax(dim=1)
    out: list[float | None] = []
    for c in range(logits.shape[1]):
        rows = labels == c
        out.append((predicted[rows] == c).float().mean().item() if rows.any() else None)
    return out


def retrieval_recall(
    similarity: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways from an [images, texts] similarity; `text_image[j]` is the image of text j.

    image->text: an image counts as found when any of its captions is in its top k texts;
    text->image: a caption counts when its image is in its top k images.
    """
    num_images, num_texts = similarity.shape
    images = torch.arange(num_images)
    kmax_t, kmax_i = min(max(ks), num_texts), min(max(ks), num_images)
    i2t = text_image[similarity.topk(kmax_t, dim=1).indices] == images.unsqueeze(1)  # [I, k]
    t2i = similarity.t().topk(kmax_i, dim=1).indices == text_image.unsqueeze(1)  # [T, k]
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = i2t[:, :k].any(dim=1).float().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = t2i[:, :k].any(dim=1).float().mean().item()
    return out


def knn_scores(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """DINO's weighted k-NN votes [Q, C]: each of the k most cosine-similar training features votes
    for its class with weight exp(similarity / T). Features are expected L2-normalised."""
    k = min(k, train.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ train.t()
        top, index = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """[C, C] pixel counts, rows = ground truth, columns = prediction; `ignore_index` pixels skipped."""
    valid = target != ignore_index
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU and mean class accuracy over classes present in the ground truth or the prediction
    (mmsegmentation's convention: absent classes are left out of the mean), and pixel accuracy."""
    conf = confusion.double()
    tp = conf.diag()
    gt, pred = conf.sum(dim=1), conf.sum(dim=0)
    union = gt + pred - tp
    iou = tp / union
    acc = tp / gt
    return {
        "mIoU": iou[union > 0].mean().item(),
        "mAcc": acc[gt > 0].mean().item(),
        "pixel_acc": (tp.sum() / conf.sum()).item(),
    }


def coco_ap(ground_truth: dict[str, Any], detections: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    """COCO AP, AP50, AP75 (IoU 0.5:0.95, 101-point interpolation) via pycocotools.

    `ground_truth` is a COCO-format dict (images, annotations, categories); `detections` are result
    dicts (image_id, category_id, score, and bbox [x, y, w, h] or an RLE segmentation)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50, ap75 = (max(0.0, float(v)) for v in evaluator.stats[:3])
    return {"AP": ap, "AP50": ap50, "AP75": ap75}


def mass_jaccard(attention: torch.Tensor, mask: torch.Tensor, keep: float = 0.6) -> float:
    """DINO's attention-mask quality: keep the highest-attention cells holding `keep` of the total
    mass, then the Jaccard index (IoU) of that set with a ground-truth foreground mask."""
    flat = attention.flatten().double()
    order = flat.argsort(descending=True, stable=True)
    cumulative = flat[order].cumsum(0) / flat.sum()
    count = int((cumulative < keep).sum().item()) + 1
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order[:count]] = True
    truth = mask.flatten().bool()
    union = (chosen | truth).sum().item()
    return (chosen & truth).sum().item() / union if union else 0.0


def topk_precision(score: torch.Tensor, mask: torch.Tensor) -> float:
    """Of the K highest-scoring cells (K = cells in the mask), the fraction inside the mask."""
    truth = mask.flatten().bool()
    k = int(truth.sum().item())
    if k == 0:
        return float("nan")
    return truth[score.flatten().topk(k).indices].float().mean().item()
