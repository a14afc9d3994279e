"""The checkpoints DINO, iBOT, DINOv2 and MAE published, vision tower: `dino:FILE`, `ibot:FILE`,
`dinov2:FILE`, `mae:FILE`, or `KIND:TIMM_NAME:FILE` to name the architecture instead of reading it from the
shapes (64 channels per attention head, as all of their ViT-S/B/L/g have; MAE's ViT-H has 80: name it).

Layouts: DINO and iBOT hold `teacher` and `student` dicts (`--init-weights` picks one; the teacher by default,
the encoder those papers evaluate) with `backbone.` (and, for the student, DDP's `module.`) prefixes; DINOv2
holds the ViT's own names, LayerScale included; MAE holds `model`. Their names are timm's ViT names; iBOT's
and DINOv2's learnt mask token becomes the tower's mask token. Register tokens (DINOv2 "reg" models) and
MAE's fine-tuned classifiers (global-average pooled, `fc_norm`) are refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harmony.core.errors import CheckpointError
from harmony.weights.source import Source, State, flat_tensors, read_state
from harmony.weights.timm_source import vit_weights
from harmony.weights.vit import image_size_of, inferred_vit, meta_vit, vision_size_of

KINDS = ("dino", "ibot", "dinov2", "mae")
MASK_TOKENS = ("masked_embed", "mask_token")  # iBOT's, DINOv2's


def _tower(raw: dict[str, Any], kind: str, weights: str, what: str) -> State:
    """The ViT's tensors of one official checkpoint, prefixes removed."""
    if kind in ("dino", "ibot"):
        pick = "student" if weights == "student" else "teacher"
        if not isinstance(raw.get(pick), dict):
            raise CheckpointError(f"{what}: no '{pick}' in the checkpoint (it holds {', '.join(map(str, raw))})")
        raw = raw[pick]
    elif kind == "mae":
        raw = raw.get("model", raw) if isinstance(raw.get("model"), dict) else raw
    state = flat_tensors(raw)
    for prefix in ("module.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if "register_tokens" in state:
        raise CheckpointError(f"{what}: its ViT has register tokens, which Harmony's vision tower does not have")
    if "fc_norm.weight" in state and "norm.weight" not in state:
        raise CheckpointError(
            f"{what}: a fine-tuned classifier (global-average pooled, fc_norm); give the pre-training checkpoint"
        )
    if kind == "mae":  # the decoder's tensors and its mask token belong to MAE's pixel decoder, not the encoder
        state = {k: v for k, v in state.items() if not k.startswith("decoder") and k != "mask_token"}
    return state


def official(kind: str, path: Path, timm_name: str | None, weights: str) -> Source:
    what = f"--init {kind}:{f'{timm_name}:' if timm_name else ''}{path}"
    tower = _tower(read_state(path, what), kind, weights, what)
    vit = meta_vit(timm_name, num_classes=0) if timm_name else inferred_vit(tower, what)

    def load() -> State:
        state = dict(tower)
        mask = next((state.pop(k) for k in MASK_TOKENS if k in state), None)
        out = vit_weights(state, vit, what)
        if mask is not None:
            out["visual.mask_token"] = mask.reshape(1, 1, -1)
        return out

    return Source(
        label=f"{kind}:{path}", weights=load, vision=vision_size_of(vit, what, timm_name), image_size=image_size_of(vit)
    )
