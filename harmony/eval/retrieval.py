"""Zero-shot image-text retrieval: Recall@1/5/10 image->text and text->image in the joint space."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from harmony.data.augment import eval_transform, normalize
from harmony.eval.captions import CaptionedImages, open_captioned
from harmony.eval.datasets import pick
from harmony.eval.metrics import retrieval_recall
from harmony.eval.report import make_result
from harmony.eval.settings import resolve
from harmony.loading import Pretrained


@dataclass(frozen=True)
class RetrievalSettings:
    ks: tuple[int, ...] = field(default=(1, 5, 10), metadata={"help": "recall cut-offs"})
    captions_per_image: int = field(default=5, metadata={"help": "captions drawn per built-in image"})
    split: str = field(default="test", metadata={"help": "split of a Karpathy-format json"})
    max_images: int = field(default=0, metadata={"help": "images used (0 = all)"})
    batch_size: int = field(default=256, metadata={"help": "encoding batch"})


RETRIEVAL_FULL = RetrievalSettings()


class _Views(Dataset[tuple[torch.Tensor, list[str]]]):
    def __init__(self, data: CaptionedImages, index: list[int], image_size: int) -> None:
        self.data, self.index, self.image_size = data, index, image_size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[str]]:
        image, captions = self.data.get(self.index[i])
        return eval_transform(image, self.image_size), captions


def _collate(batch: list[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[list[str]]]:
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


@torch.no_grad()
def embed_pairs(
    pretrained: Pretrained,
    data: CaptionedImages,
    index: list[int],
    device: torch.device,
    batch_size: int,
    num_workers: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings [I, E], caption embeddings [T, E], image index of each caption [T])."""
    model, tokenizer = pretrained.model, pretrained.tokenizer
    assert tokenizer is not None
    loader = DataLoader(
        _Views(data, index, pretrained.image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    images, texts = [], []
    owners: list[int] = []
    seen = 0
    for pixels, captions in loader:
        images.append(model.encode_image(normalize(pixels.to(device))).float().cpu())
        flat = [c for group in captions for c in group]
        texts.append(model.encode_text(tokenizer(flat).to(device)).float().cpu())
        owners.extend(seen + i for i, group in enumerate(captions) for _ in group)
        seen += len(captions)
    return torch.cat(images), torch.cat(texts), torch.tensor(owners)


def run_retrieval(
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    image_root: Path | None = None,
    num_workers: int = 2,
    **overrides: Any,
) -> dict[str, Any]:
    """Recall@k both ways over a captioned set (several captions per image count as one image's)."""
    started = time.perf_counter()
    s = resolve(RetrievalSettings(), RETRIEVAL_FULL, data_spec, overrides)
    if pretrained.tokenizer is None or not pretrained.model.has_text:
        raise ValueError(
            f"checkpoint '{pretrained.path}' has no text tower ({pretrained.weights}); retrieval needs one"
        )
    data = open_captioned(data_spec, pretrained.config, s.captions_per_image, image_root, s.split)
    index = pick(len(data), s.max_images)
    image_emb, text_emb, owners = embed_pairs(pretrained, data, index, device, s.batch_size, num_workers)
    metrics = retrieval_recall(image_emb @ text_emb.t(), owners, s.ks)
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    dataset = {"spec": data_spec, "num_images": len(index), "num_captions": len(owners)}
    return make_result("retrieval", pretrained, dataset, s, metrics, started)
