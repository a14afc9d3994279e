"""timm weights: `timm:MODEL_NAME:FILE` (a state dict in any layout timm's ViT converter reads: timm's own,
OpenAI's CLIP, open_clip's timm trunk, DINOv2) and a timm `local-dir` folder (`config.json` + weights, as
`harmony export --format timm` and timm's `save_pretrained` write). Vision tower only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from harmony.core.errors import CheckpointError
from harmony.weights.source import Source, State, flat_tensors, read_state
from harmony.weights.vit import image_size_of, meta_vit, vision_size_of

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


def vit_weights(state: State, vit: VisionTransformer, what: str) -> State:
    """A state dict in timm's names for `vit`, keys and shapes checked against it (a classifier head is
    dropped), under the pair's names (`visual.vit.*`); a file of another architecture is one line."""
    state = checkpoint_filter_fn(dict(state), vit)
    own = {k: tuple(v.shape) for k, v in vit.state_dict().items() if not k.startswith("head.")}
    got = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("head.")}
    missing = [k for k in own if k not in got]
    wrong = [k for k in own if k in got and got[k] != own[k]]
    if missing or wrong:
        problem = f"{len(missing)} missing (e.g. {missing[0]})" if missing else ""
        if wrong:
            k = wrong[0]
            problem += ("; " if problem else "") + f"{len(wrong)} of other shapes (e.g. {k}: {got[k]} vs {own[k]})"
        raise CheckpointError(f"{what}: the weights are not those of this architecture: {problem}")
    return {f"visual.vit.{k}": v for k, v in state.items() if k in own}


def timm_file(name: str, path: Path) -> Source:
    """`timm:MODEL_NAME:FILE`."""
    what = f"--init timm:{name}:{path}"
    try:
        vit = meta_vit(name, what, num_classes=0)
    except RuntimeError as exc:  # timm: unknown model name
        raise CheckpointError(f"{what}: {str(exc).splitlines()[0]}") from None
    return Source(
        label=f"timm:{name}",
        weights=lambda: vit_weights(flat_tensors(read_state(path, what)), vit, what),
        vision=vision_size_of(vit, what, timm_name=name.split(".")[0]),
        image_size=image_size_of(vit),
    )


def timm_folder(folder: Path) -> Source:
    """A timm `local-dir` folder: `config.json` (architecture, model_args) and the weights beside it."""
    what = f"--init {folder}"
    config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    name = config.get("architecture")
    if not isinstance(name, str):
        raise CheckpointError(f"{what}: config.json names no timm architecture")
    args = dict(config.get("model_args", {}))
    args.pop("num_classes", None)
    vit = meta_vit(name, num_classes=0, **args)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{what}: no weights beside config.json (looked for {', '.join(WEIGHT_FILES[:2])})")
    return Source(
        label=f"timm:{folder}",
        weights=lambda: vit_weights(flat_tensors(read_state(weights, what)), vit, what),
        vision=vision_size_of(vit, what, timm_name=None if args else name.split(".")[0]),
        image_size=image_size_of(vit),
    )
