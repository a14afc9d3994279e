"""Zero-shot classification: class names x prompt templates -> mean normalised text embeddings,
images classified by cosine similarity; top-1 / top-5 accuracy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from harmony.eval.datasets import extract, open_labelled
from harmony.loading import Pretrained
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer

DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a drawing of a {}.",
    "a rendering of the {}.",
    "a close-up photo of a {}.",
    "a {} shape.",
]


def read_lines(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


@torch.no_grad()
def class_embeddings(
    model: ImageTextModel,
    tokenizer: CaptionTokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
) -> torch.Tensor:
    """[C, E]: per class, the normalised mean of the normalised template embeddings."""
    rows = []
    for name in class_names:
        ids = tokenizer([t.format(name) for t in templates]).to(device)
        rows.append(F.normalize(model.encode_text(ids).float().mean(dim=0), dim=-1))
    return torch.stack(rows)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        hit = (logits.topk(k_eff, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
        out[f"top{k}"] = hit.float().mean().item()
    return out


def run_zeroshot(
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
) -> dict[str, Any]:
    start = time.perf_counter()
    model, tokenizer = pretrained.model, pretrained.tokenizer
    if tokenizer is None or not model.has_text:
        raise ValueError(
            f"checkpoint '{pretrained.path}' has no text tower ({pretrained.weights}); zero-shot needs one"
        )
    data = open_labelled(data_spec, pretrained.config)
    names = list(class_names) if class_names else data.class_names
    if len(names) != len(data.class_names):
        raise ValueError(f"{len(names)} class names given for a dataset with {len(data.class_names)} classes")
    prompts = list(templates) if templates else DEFAULT_TEMPLATES
    weights = class_embeddings(model, tokenizer, names, prompts, device)
    feats, labels = extract(model.encode_image, data, pretrained.image_size, device, batch_size, num_workers)
    logits = feats @ weights.cpu().t()
    metrics = topk_accuracy(logits, labels)
    metrics["chance"] = 1.0 / len(names)
    return {
        "task": "zeroshot",
        "checkpoint": str(pretrained.path),
        "weights": pretrained.weights,
        "step": pretrained.step,
        "dataset": {"spec": data_spec, "num_images": len(data), "num_classes": len(names), "class_names": names},
        "templates": prompts,
        "metrics": metrics,
        "time_s": round(time.perf_counter() - start, 3),
    }
