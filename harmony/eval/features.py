"""Frozen-backbone features for k-NN and linear probes, cached on disk.

Per image the cache keeps a small "token summary" [SUMMARY_BLOCKS + 1, D]: the CLS token of each of
the last blocks (after the final norm, DINOv2's `get_intermediate_layers(norm=True)`), oldest first,
then the average of the last block's patch tokens. k-NN uses the last CLS row; the linear probe builds
any (last-n CLS, +avgpool) input from it. Entries are keyed by checkpoint file (path, size, mtime),
weights, data spec, subset, image size and the data's files (their paths, sizes and modification
times), so a second protocol or a re-run skips extraction and an edited folder is extracted afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from harmony.eval.datasets import LabelledImages, extract
from harmony.eval.images import Skips
from harmony.loading import Pretrained
from harmony.models.cnn import CNNTower
from harmony.models.vision import VisionTower

SUMMARY_BLOCKS = 4


def default_cache_dir() -> Path:
    """$HARMONY_CACHE/features, else ~/.cache/harmony/features."""
    root = os.environ.get("HARMONY_CACHE") or Path.home() / ".cache" / "harmony"
    return Path(root) / "features"


def summary_blocks(visual: VisionTower | CNNTower) -> int:
    return 1 if isinstance(visual, CNNTower) else min(SUMMARY_BLOCKS, len(visual.vit.blocks))


def token_summary(visual: VisionTower | CNNTower, images: torch.Tensor) -> torch.Tensor:
    """[B, n + 1, D]: CLS of the last n blocks (normed), then the mean patch token of the last block. A CNN's
    pooled feature stands for both (n = 1): k-NN and the linear probe read it."""
    if isinstance(visual, CNNTower):
        pooled = visual(images)[:, 0]
        return torch.stack([pooled, pooled], dim=1)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = visual.vit.forward_intermediates(  # type: ignore[assignment]
        images,
        indices=summary_blocks(visual),
        norm=True,
        return_prefix_tokens=True,
        output_fmt="NLC",
        intermediates_only=True,
    )
    cls = [prefix[:, 0] for _, prefix in outputs]
    return torch.stack([*cls, outputs[-1][0].mean(dim=1)], dim=1)


def linear_input(summary: torch.Tensor, n_blocks: int, avgpool: bool) -> torch.Tensor:
    """DINOv2's linear-probe input: concatenated CLS of the last `n_blocks`, plus the avg-pooled patches."""
    cls = summary[:, -1 - n_blocks : -1].flatten(1)
    return torch.cat([cls, summary[:, -1]], dim=1) if avgpool else cls


def _key(pretrained: Pretrained, data: LabelledImages, image_size: int) -> str:
    ident = {
        "checkpoint": str(pretrained.path.resolve()),
        **pretrained.file_identity,
        "weights": pretrained.weights,
        "data": data.name,
        "files": data.identity,
        "num": len(data),
        "image_size": image_size,
        "blocks": summary_blocks(pretrained.model.visual),
    }
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def cached_summaries(
    pretrained: Pretrained,
    data: LabelledImages,
    device: torch.device,
    cache_dir: Path | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    skips: Skips | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token summaries [N, n + 1, D] float32, labels [N]) of the readable images of a labelled set, from
    the cache when present; unreadable images are counted in `skips` (the cache remembers them too)."""
    image_size = pretrained.image_size
    folder = cache_dir or default_cache_dir()
    path = folder / f"{_key(pretrained, data, image_size)}.pt"
    skips = Skips() if skips is None else skips
    if path.exists():
        stored = torch.load(path, map_location="cpu")
        skips.merge(stored.get("skipped", {}))
        return stored["features"].float(), stored["labels"]
    visual = pretrained.model.visual
    mine = Skips()
    feats, labels = extract(
        lambda images: token_summary(visual, images), data, image_size, device, batch_size, num_workers, mine
    )
    skips.merge(mine.as_dict())
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save({"features": feats.half(), "labels": labels, "data": data.name, "skipped": mine.as_dict()}, partial)
    partial.replace(path)
    return feats.half().float(), labels
