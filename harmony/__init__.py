"""Harmony: joint vision-language and self-supervised pre-training of vision encoders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from harmony.loading import Pretrained


def load(path: str, weights: str = "auto", device: Any = "cpu") -> Pretrained:
    """Encoders and tokenizer from a checkpoint (see `harmony.loading.load`)."""
    from harmony.loading import load as _load

    return _load(path, weights=weights, device=device)  # type: ignore[arg-type]
