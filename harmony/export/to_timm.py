"""The vision tower for timm: one safetensors file of the ViT under timm's own names, and a JSON sidecar
holding the exact `timm.create_model` call (also a timm `config.json`).

timm's ViT names build a 1000-class head and their default pretrained cfg says 1000 classes, so
`load_pretrained` loads strictly and a file without `head.*` would fail. Pre-training trains no ImageNet
classifier, so the file carries an all-zero 1000-class head: an honest placeholder (every logit is 0) that
lets the plain call load with no missing keys. Any other `num_classes` (0 for features) drops it.

The architecture is a timm model name where the tower has one (every named size, a tower started from timm),
else a base name with every setting as a JSON argument; a LayerNorm epsilon other than timm's 1e-6 cannot be
written as an argument, so a tower with one (CLIP's 1e-5) is written under the timm name of its architecture.

A CNN image tower (`model.vision=timm:NAME`) is timm's own model already: its state dict is written as it is,
without a classifier, for `timm.create_model(NAME, pretrained=False, num_classes=0, **model_args)` to load
(`export_cnn_timm`; the sidecar's call loads the file itself, with num_classes=0)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import timm
import torch

from harmony.core.errors import CheckpointError, ConfigError
from harmony.export.common import ExportError, check_against, cpu, data_config, image_size, save_safetensors
from harmony.models.cnn import CNNTower
from harmony.models.pair import ImageTextModel
from harmony.models.sizes import VisionSize
from harmony.models.vision import VisionTower
from harmony.weights.vit import image_size_of, meta_vit, vision_size_of

TIMM_NUM_CLASSES = 1000  # the head of timm's ViT names and of their default pretrained cfgs
TIMM_FALLBACK_NAME = "vit_tiny_patch16_224"  # base name for architectures without one (kwargs set every setting)


@dataclass(frozen=True)
class TimmArch:
    """A timm model name plus the kwargs that turn it into our ViT (empty when the name alone does)."""

    model_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def timm_arch(visual: VisionTower) -> TimmArch:
    """The timm call that builds this tower (module doc)."""
    spec, size = visual.spec, image_size(visual)
    name = spec.timm_name or (timm_name_like(spec) if spec.norm_eps != 1e-6 else None)
    if name is not None:
        default = image_size_of(meta_vit(name))
        return TimmArch(name, {} if size == default else {"img_size": size})
    kwargs: dict[str, Any] = {k: getattr(spec, k) for k in ("patch_size", "embed_dim", "depth", "num_heads")}
    if spec.mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = spec.mlp_ratio
    if spec.pre_norm:
        kwargs["pre_norm"] = True
    if spec.act != "gelu":
        kwargs["act_layer"] = spec.act
    if spec.layer_scale is not None:
        kwargs["init_values"] = spec.layer_scale
    if size != 224:
        kwargs["img_size"] = size
    return TimmArch(TIMM_FALLBACK_NAME, kwargs)


@cache
def timm_name_like(spec: VisionSize) -> str:
    """A timm ViT name whose architecture is `spec`'s (for what JSON arguments cannot express)."""
    wanted = dataclasses.replace(spec, timm_name=None, layer_scale=1e-5 if spec.layer_scale else None)
    for name in timm.list_models(f"vit_*patch{spec.patch_size}*"):
        try:
            if vision_size_of(meta_vit(name, num_classes=0), name) == wanted:
                return str(name)
        except (CheckpointError, TypeError, RuntimeError, AttributeError, ValueError):  # not a ViT of ours
            continue
    raise ExportError(
        f"timm has no ViT of this architecture (LayerNorm epsilon {spec.norm_eps}, width {spec.embed_dim}, depth "
        f"{spec.depth}, patch {spec.patch_size}): export it with --format open_clip or --format hf"
    )


def timm_state_dict(visual: VisionTower, classes: int = TIMM_NUM_CLASSES) -> dict[str, torch.Tensor]:
    """The ViT under timm's names with the zero placeholder head (see the module docstring)."""
    state = cpu(visual.vit.state_dict())
    state["head.weight"] = torch.zeros(classes, visual.embed_dim)
    state["head.bias"] = torch.zeros(classes)
    return state


def _python_call(name: str, kwargs: dict[str, Any], overlay: dict[str, Any]) -> str:
    """The `timm.create_model(...)` line to paste (lists written as tuples, as timm's cfgs have them)."""

    def arg(key: str, value: Any) -> str:
        return f"{key}={tuple(value) if isinstance(value, list) else value!r}"

    args = [repr(name), "pretrained=True", *(arg(k, v) for k, v in kwargs.items())]
    args.append("pretrained_cfg_overlay=dict(" + ", ".join(arg(k, v) for k, v in overlay.items()) + ")")
    return f"timm.create_model({', '.join(args)})"


def check_timm_out(out: Path) -> None:
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out for --format timm must be a .safetensors file, got '{out}'")


def export_timm(model: ImageTextModel, out: Path, provenance: dict[str, Any] | None = None) -> list[Path]:
    """Write the vision tower to `out` (.safetensors) and the `timm.create_model` recipe to `out.json`.

    The sidecar is also a timm `config.json` (architecture, model_args, pretrained_cfg): renamed to
    `config.json` next to a `model.safetensors`, the folder loads with `timm.create_model('local-dir:...')`.
    """
    check_timm_out(out)
    if isinstance(model.visual, CNNTower):
        return export_cnn_timm(model.visual, out, provenance)
    arch = timm_arch(model.visual)
    with torch.device("meta"):
        reference = timm.create_model(arch.model_name, pretrained=False, **arch.kwargs)
    classes = int(getattr(reference, "num_classes", TIMM_NUM_CLASSES))
    state = timm_state_dict(model.visual, classes)
    projection = getattr(model, "visual_projection", None)
    if (
        arch.model_name.endswith(("_clip_224", "_clip_quickgelu_224"))
        and projection is not None
        and projection.out_features == classes
    ):
        # timm's CLIP towers keep the image projection as their head: it goes there (with timm's zero bias)
        state["head.weight"] = projection.weight.detach().cpu().contiguous()
        head_note = f"head is the CLIP image projection to {classes} dimensions (timm's CLIP convention)"
    else:
        head_note = (
            f"head.weight/head.bias are an all-zero {classes}-class placeholder (pre-training trains no "
            "classifier); pass num_classes=0 for features or num_classes=N to get a fresh head"
        )
    check_against(state, reference, f"timm '{arch.model_name}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = data_config(image_size(model.visual))
    overlay = {"file": str(out.resolve()), **data, "num_classes": classes, "classifier": "head"}
    metadata = {
        "format": "pt",
        "harmony.export": "timm",
        "timm.model_name": arch.model_name,
        "timm.kwargs": json.dumps(arch.kwargs),
        "timm.data_config": json.dumps(data),
        "classifier": head_note,
    }
    save_safetensors(state, out, metadata)
    sidecar = out.with_suffix(".json")
    recipe = {
        "architecture": arch.model_name,
        "num_classes": classes,
        "num_features": model.visual.embed_dim,
        "model_args": arch.kwargs,
        "pretrained_cfg": {**data, "num_classes": classes, "classifier": "head"},
        "create_model": {
            "model_name": arch.model_name,
            "pretrained": True,
            **arch.kwargs,
            "pretrained_cfg_overlay": overlay,
        },
        "python": _python_call(arch.model_name, arch.kwargs, overlay),
        "classifier_head": head_note,
        "harmony": dict(provenance or {}),
    }
    sidecar.write_text(json.dumps(recipe, indent=2) + "\n")
    return [out, sidecar]


def export_cnn_timm(visual: CNNTower, out: Path, provenance: dict[str, Any] | None = None) -> list[Path]:
    """Write a CNN tower's timm state dict (no classifier) to `out` and the `timm.create_model` recipe beside it."""
    name, kwargs = visual.spec.timm_name, dict(visual.spec.kwargs)
    state = cpu(visual.net.state_dict())
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    check_against(state, reference, f"timm '{name}' with num_classes=0")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = data_config(visual.img_size)
    overlay = {"file": str(out.resolve()), **data, "num_classes": 0}
    save_safetensors(state, out, {"format": "pt", "harmony.export": "timm", "timm.model_name": name})
    recipe = {
        "architecture": name,
        "num_classes": 0,
        "num_features": visual.embed_dim,
        "model_args": kwargs,
        "pretrained_cfg": {**data, "num_classes": 0},
        "create_model": {
            "model_name": name,
            "pretrained": True,
            "num_classes": 0,
            **kwargs,
            "pretrained_cfg_overlay": overlay,
        },
        "python": _python_call(name, {"num_classes": 0, **kwargs}, overlay),
        "classifier_head": "none: the pooled features (num_classes=0); pass num_classes=N for a fresh head",
        "harmony": dict(provenance or {}),
    }
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(recipe, indent=2) + "\n")
    return [out, sidecar]
