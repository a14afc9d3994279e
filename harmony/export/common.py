"""What every export shares: the error, the tower's trained resolution, timm's preprocessing record, CPU
copies of tensors, the key-and-shape check against the target library's model, and writing safetensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from harmony.core.errors import CheckpointError
from harmony.models.normalize import IMAGENET_MEAN, IMAGENET_STD
from harmony.models.pair import ImageTextModel
from harmony.models.vision import VisionTower


class ExportError(CheckpointError):
    """The checkpoint cannot be exported in the requested format (a CheckpointError: the CLI exits 1)."""


def vit_of(model: ImageTextModel) -> VisionTower:
    """The model's ViT image tower; a CNN tower exports to timm alone (`check_exportable`)."""
    if not isinstance(model.visual, VisionTower):
        raise ExportError("a CNN image tower exports with --format timm only")
    return model.visual


def check_exportable(model: ImageTextModel, target: str, vision: str) -> None:
    """Refuse, in one line, towers that open_clip's and transformers' CLIP classes do not hold: a CNN image tower,
    and a bidirectional text tower pooled at its first token (ALIGN's), whose padding mask they do not apply."""
    if not isinstance(model.visual, VisionTower):
        raise ExportError(f"--format {target} holds ViT image towers; the CNN {vision} exports with --format timm")
    text = model.text.spec if model.text is not None else None
    if text is not None and (not text.causal or text.pool != "eot"):
        raise ExportError(
            f"--format {target} holds CLIP's causal text tower; this one is bidirectional, pooled at its first "
            "token (its padding is masked out, which that format's text tower does not do): export the image "
            "tower with --format timm"
        )


def image_size(visual: VisionTower) -> int:
    """The (square) input size the position table was trained for."""
    return int(visual.vit.patch_embed.grid_size[0]) * visual.patch_size


def data_config(size: int) -> dict[str, Any]:
    """Preprocessing as timm spells it: our eval view (short side to `size`, centre crop) + ImageNet stats."""
    return {
        "input_size": [3, size, size],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


def cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def check_against(state: dict[str, torch.Tensor], reference: nn.Module, target: str) -> None:
    """Raise ExportError unless `state` has exactly the keys and shapes of `reference`."""
    own = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in own if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in own]
    problems += [f"{k}: {got[k]} vs {own[k]}" for k in own if k in got and got[k] != own[k]]
    if problems:
        raise ExportError(f"export does not match {target} ({len(problems)} problems, e.g. {problems[0]})")


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`save_file`, then the mode any new file gets (0666 less the umask): safetensors creates its files
    0600, which hides an export from the other users and services meant to read it."""
    save_file(state, str(path), metadata=metadata)
    readable(path)


def readable(path: Path) -> None:
    """Give `path` the mode a new file gets (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
