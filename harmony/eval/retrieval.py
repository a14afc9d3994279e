"""Zero-shot image-text retrieval: Recall@1/5/10 image->text and text->image in the joint space."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from harmony.core.colors import WHITE
from harmony.core.errors import CheckpointError, ConfigError
from harmony.data.errors import SampleError
from harmony.eval.captions import CaptionedImages, TableColumns, open_captioned
from harmony.eval.datasets import pick
from harmony.eval.images import Colour, SkippingLoader, Skips, either, require_some
from harmony.eval.metrics import retrieval_recall
from harmony.eval.report import make_result
from harmony.eval.settings import resolve
from harmony.eval.transforms import eval_transform
from harmony.loading import Pretrained
from harmony.models.normalize import normalize
from harmony.models.pair import ImageTextModel


@dataclass(frozen=True)
class RetrievalSettings:
    ks: tuple[int, ...] = field(default=(1, 5, 10), metadata={"help": "recall cut-offs"})
    captions_per_image: int = field(default=5, metadata={"help": "captions drawn per built-in image"})
    split: str = field(default="test", metadata={"help": "split of a Karpathy-format json"})
    max_images: int = field(default=0, metadata={"help": "images used (0 = all)"})
    batch_size: int = field(default=256, metadata={"help": "encoding batch"})
    image_key: str = field(default="filepath", metadata={"help": "CSV/TSV column of image paths"})
    caption_key: str = field(default="caption", metadata={"help": "CSV/TSV column of captions"})
    separator: str = field(default="auto", metadata={"help": "CSV/TSV separator: auto, comma, tab or one character"})


RETRIEVAL_FULL = RetrievalSettings()


class _Views(Dataset[tuple[torch.Tensor, list[str]] | SampleError]):
    def __init__(self, data: CaptionedImages, index: list[int], image_size: int) -> None:
        self.data, self.index, self.image_size = data, index, image_size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[str]] | SampleError:
        item = either(self.data.get, self.index[i])
        if isinstance(item, SampleError):
            return item
        image, captions = item
        return eval_transform(image, self.image_size), captions


def _collate(batch: list[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[list[str]]]:
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def pair_batches(
    data: CaptionedImages, index: list[int], image_size: int, batch_size: int, num_workers: int, skips: Skips
) -> SkippingLoader[tuple[torch.Tensor, list[list[str]]]]:
    """Batches (uint8 eval views, each image's captions) of the images `index`; unreadable ones counted in `skips`."""
    return SkippingLoader(
        _Views(data, index, image_size), skips, _collate, batch_size=batch_size, num_workers=num_workers
    )


@torch.no_grad()
def embed_pair_batch(
    model: ImageTextModel, pixels: torch.Tensor, ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings, caption embeddings) of one batch: uint8 images and its captions' token ids."""
    images = model.encode_image(normalize(pixels.to(device))).float().cpu()
    return images, model.encode_text(ids.to(device)).float().cpu()


def caption_owners(counts: Sequence[int]) -> torch.Tensor:
    """The image index of each caption, from the number of captions of each image in order."""
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))


def embed_pairs(
    pretrained: Pretrained,
    data: CaptionedImages,
    index: list[int],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    skips: Skips | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings [I, E], caption embeddings [T, E], image index of each caption [T]) of the
    readable images; unreadable ones are counted in `skips`."""
    model, tokenizer = pretrained.model, pretrained.tokenizer
    assert tokenizer is not None
    skips = Skips() if skips is None else skips
    images, texts = [], []
    counts: list[int] = []
    for pixels, captions in pair_batches(data, index, pretrained.image_size, batch_size, num_workers, skips):
        image_emb, text_emb = embed_pair_batch(
            model, pixels, tokenizer([c for group in captions for c in group]), device
        )
        images.append(image_emb)
        texts.append(text_emb)
        counts.extend(len(group) for group in captions)
    require_some(len(counts), skips, data.name)
    return torch.cat(images), torch.cat(texts), caption_owners(counts)


def recall_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, owners: torch.Tensor, ks: Sequence[int]
) -> dict[str, float]:
    """Recall@k image->text and text->image, and their mean (`mean_recall`)."""
    metrics = retrieval_recall(image_emb @ text_emb.t(), owners, ks)
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def run_retrieval(
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    image_root: Path | None = None,
    num_workers: int = 2,
    background: Colour = WHITE,
    **overrides: Any,
) -> dict[str, Any]:
    """Recall@k both ways over a captioned set (several captions per image count as one image's)."""
    started = time.perf_counter()
    s = resolve(RetrievalSettings(), RETRIEVAL_FULL, data_spec, overrides)
    if pretrained.tokenizer is None or not pretrained.model.has_text:
        raise CheckpointError(
            f"checkpoint '{pretrained.path}' has no text tower ({pretrained.weights}); retrieval needs one"
        )
    if not s.ks or any(k < 1 for k in s.ks):
        raise ConfigError(f"--ks needs positive recall cut-offs, got {','.join(map(str, s.ks)) or 'none'}")
    columns = TableColumns(s.image_key, s.caption_key, s.separator)
    data = open_captioned(data_spec, pretrained.config, s.captions_per_image, image_root, s.split, columns, background)
    index = pick(len(data), s.max_images)
    skips = Skips()
    skips.merge(data.skipped)
    image_emb, text_emb, owners = embed_pairs(pretrained, data, index, device, s.batch_size, num_workers, skips)
    trivial = [k for k in s.ks if k >= len(image_emb)]
    if trivial:
        print(
            f"harmony eval retrieval: warning: with {len(image_emb)} images, text->image "
            f"recall@{','.join(map(str, trivial))} is 1 by construction",
            file=sys.stderr,
        )
    metrics = recall_metrics(image_emb, text_emb, owners, s.ks)
    dataset = {
        "spec": data_spec,
        "num_images": len(image_emb),
        "num_captions": len(owners),
        "skipped": skips.as_dict(),
    }
    return make_result("retrieval", pretrained, dataset, s, metrics, started, background)
