"""What a `--init` source gives a run: its architecture, which decides the model settings, and its weights
under the names of Harmony's image-text pair (`ImageTextModel`), read only when the run starts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harmony.core.errors import CheckpointError
from harmony.models.sizes import TextSize, VisionSize

State = dict[str, torch.Tensor]


@dataclass
class Source:
    """A starting point. `vision` / `text` are the towers it holds (None: it has none; that tower starts
    fresh), `image_size` the resolution its position table was trained at, `embed_dim` the joint space of its
    projections (None without them), `vocab_size` its text vocabulary (CLIP's BPE: 49,408, `[MASK]` excluded).
    `weights()` reads its tensors under the pair's names: `visual.vit.*` (timm's ViT names), `text.*`,
    `visual_projection.weight`, `text_projection`, `logit_scale` (a Harmony run adds `objectives.*`)."""

    label: str
    weights: Callable[[], State]
    vision: VisionSize | None = None
    image_size: int | None = None
    text: TextSize | None = None
    context_length: int | None = None
    vocab_size: int | None = None
    embed_dim: int | None = None
    notes: list[str] = field(default_factory=list)


CLIP_VOCAB = 49408  # CLIP's byte-level BPE, which Harmony's tokenizer is (plus one [MASK] id)


def read_state(path: Path, what: str) -> dict[str, Any]:
    """The tensors of a weights file (.safetensors, or a PyTorch pickle of tensors: .pth/.pt/.bin), as one
    flat mapping; a missing, truncated or foreign file is a one-line CheckpointError naming `what`."""
    if not path.is_file():
        raise CheckpointError(f"{what}: '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{what}: '{path}' is not a readable safetensors file ({_first_line(exc)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"{what}: '{path}' cannot be read as PyTorch weights ({_first_line(exc)}); a truncated download?"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: '{path}' holds a {type(state).__name__}, not a mapping of tensors")
    return state


def flat_tensors(state: Mapping[str, object]) -> State:
    """The tensor entries of a checkpoint mapping (configs, epochs and optimiser states left out)."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
