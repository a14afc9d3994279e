"""`harmony export`: a checkpoint's encoders for timm (vision tower) and open_clip (image + text towers).

timm: one safetensors file of the ViT under timm's own key names, plus a JSON sidecar that holds the
exact `timm.create_model` call. timm's ViT names build a 1000-class head and their default pretrained
cfg says 1000 classes, so `load_pretrained` loads strictly and a file without `head.*` would fail.
Pre-training trains no ImageNet classifier, so the file carries an all-zero 1000-class head: an
honest placeholder (every logit is 0) that lets the plain call load with no missing keys. Asking for
any other `num_classes` (0 for features) makes timm drop the placeholder.

open_clip: a folder for open_clip's `local-dir:` schema (`open_clip_config.json` +
`open_clip_model.safetensors`): timm trunk with CLS pooling and a bias-free linear projection, and
the CLIP text tower pooled at the end-of-text id (`pool_type='eos'`), not by argmax, which would
pick the `[MASK]` id.

Both exports are checked against the target library's model built on the meta device (keys and
shapes), so an incompatible timm/open_clip version fails here rather than in the user's code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from harmony.config import ConfigError
from harmony.core.checkpoint import CheckpointError
from harmony.models.normalize import IMAGENET_MEAN, IMAGENET_STD
from harmony.models.pair import ImageTextModel
from harmony.models.sizes import TEXT_SIZES, VISION_SIZES
from harmony.models.vision import VisionTower

if TYPE_CHECKING:
    from harmony.loading import Pretrained

TIMM_NUM_CLASSES = 1000  # the head of timm's ViT names and of their default pretrained cfgs
TIMM_DEFAULT_IMG_SIZE = 224  # timm's VisionTransformer default, kept by every `*_224` name
TIMM_FALLBACK_NAME = "vit_tiny_patch16_224"  # base name for sizes without one (kwargs set every dim)
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"


class ExportError(CheckpointError):
    """The checkpoint cannot be exported in the requested format (a CheckpointError: the CLI exits 1)."""


@dataclass(frozen=True)
class TimmArch:
    """A timm model name plus the kwargs that turn it into our ViT (empty when the name alone does)."""

    model_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def timm_arch(visual: VisionTower) -> TimmArch:
    """The size's timm name when it has one, else a base name with every dimension as a kwarg."""
    spec = VISION_SIZES[visual.size_name]
    kwargs: dict[str, Any] = {}
    if spec.timm_name is None:
        kwargs = {
            "patch_size": spec.patch_size,
            "embed_dim": spec.embed_dim,
            "depth": spec.depth,
            "num_heads": spec.num_heads,
        }
    img_size = image_size(visual)
    if img_size != TIMM_DEFAULT_IMG_SIZE:
        kwargs["img_size"] = img_size
    return TimmArch(spec.timm_name or TIMM_FALLBACK_NAME, kwargs)


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


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def timm_state_dict(visual: VisionTower) -> dict[str, torch.Tensor]:
    """The ViT under timm's names with the zero placeholder head (see the module docstring)."""
    state = _cpu(visual.vit.state_dict())
    state["head.weight"] = torch.zeros(TIMM_NUM_CLASSES, visual.embed_dim)
    state["head.bias"] = torch.zeros(TIMM_NUM_CLASSES)
    return state


def _mlp_ratio(vit: nn.Module, width: int) -> float:
    """The blocks' MLP width over the model width (timm's `mlp_ratio`)."""
    return vit.state_dict()["blocks.0.mlp.fc1.weight"].shape[0] / width


def native_vision(model: ImageTextModel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """open_clip's own ViT (`vision_cfg`, `visual.*` weights) holding our vision tower exactly: used for sizes
    timm has no name for (or another resolution), whose timm trunk open_clip could only build from a timm
    config folder named by absolute path. The patch embedding's bias, a constant added to every patch token,
    moves into the patch rows of the position table (open_clip's patch convolution has none)."""
    vit, spec = model.visual.vit, VISION_SIZES[model.visual.size_name]
    vision_cfg = {
        "image_size": image_size(model.visual),
        "layers": spec.depth,
        "width": spec.embed_dim,
        "head_width": spec.embed_dim // spec.num_heads,
        "mlp_ratio": _mlp_ratio(vit, spec.embed_dim),
        "patch_size": spec.patch_size,
        "no_ln_pre": True,
        "pool_type": "tok",
        "final_ln_after_pool": False,
        "norm_kwargs": {"eps": vit.norm.eps},
    }
    own = _cpu(vit.state_dict())
    positions = own["pos_embed"][0].clone()
    positions[1:] += own["patch_embed.proj.bias"]
    state = {
        "visual.conv1.weight": own["patch_embed.proj.weight"],
        "visual.class_embedding": own["cls_token"].reshape(-1),
        "visual.positional_embedding": positions,
        "visual.ln_post.weight": own["norm.weight"],
        "visual.ln_post.bias": own["norm.bias"],
        "visual.proj": model.visual_projection.weight.detach().cpu().t().contiguous(),
    }
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.in_proj", "attn.proj": "attn.out_proj"}
    names |= {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(spec.depth):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                key = f"visual.transformer.resblocks.{i}.{theirs}"
                key = f"{key}_{kind}" if theirs == "attn.in_proj" else f"{key}.{kind}"
                state[key] = own[f"blocks.{i}.{ours}.{kind}"]
    return vision_cfg, state


def open_clip_state_dict(
    model: ImageTextModel, logit_bias: float | None = None, native: bool = False
) -> dict[str, torch.Tensor]:
    """Both towers under open_clip's CLIP names (the text tower already uses them), the image tower as a timm
    trunk or, with `native`, as open_clip's own ViT; SigLIP's bias as open_clip's `logit_bias` where there is
    one."""
    assert model.text is not None
    if native:
        state = native_vision(model)[1]
    else:
        state = {f"visual.trunk.{k}": v for k, v in _cpu(model.visual.vit.state_dict()).items()}
        state["visual.head.proj.weight"] = model.visual_projection.weight.detach().cpu().contiguous()
    state.update(_cpu(model.text.state_dict()))
    state["text_projection"] = model.text_projection.detach().cpu().contiguous()
    # open_clip keeps a 0-d scale and does not clamp it: store ours clamped, as `model.scale()` uses it
    state["logit_scale"] = model.logit_scale.detach().cpu().clamp(max=math.log(model.logit_scale_max)).reshape(())
    if logit_bias is not None:
        state["logit_bias"] = torch.tensor(logit_bias)
    return state


def check_against(state: dict[str, torch.Tensor], reference: nn.Module, target: str) -> None:
    """Raise ExportError unless `state` has exactly the keys and shapes of `reference`."""
    own = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in own if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in own]
    problems += [f"{k}: {got[k]} vs {own[k]}" for k in own if k in got and got[k] != own[k]]
    if problems:
        raise ExportError(f"export does not match {target} ({len(problems)} problems, e.g. {problems[0]})")


def _python_call(name: str, kwargs: dict[str, Any], overlay: dict[str, Any]) -> str:
    """The `timm.create_model(...)` line to paste (lists written as tuples, as timm's cfgs have them)."""

    def arg(key: str, value: Any) -> str:
        return f"{key}={tuple(value) if isinstance(value, list) else value!r}"

    args = [repr(name), "pretrained=True", *(arg(k, v) for k, v in kwargs.items())]
    args.append("pretrained_cfg_overlay=dict(" + ", ".join(arg(k, v) for k, v in overlay.items()) + ")")
    return f"timm.create_model({', '.join(args)})"


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`save_file`, then the mode any new file gets (0666 less the umask): safetensors creates its files
    0600, which hides an export from the other users and services meant to read it."""
    save_file(state, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def check_timm_out(out: Path) -> None:
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out for --format timm must be a .safetensors file, got '{out}'")


def export_timm(model: ImageTextModel, out: Path, provenance: dict[str, Any] | None = None) -> list[Path]:
    """Write the vision tower to `out` (.safetensors) and the `timm.create_model` recipe to `out.json`.

    The sidecar is also a timm `config.json` (architecture, model_args, pretrained_cfg): renamed to
    `config.json` next to a `model.safetensors`, the folder loads with `timm.create_model('local-dir:...')`.
    """
    import timm

    check_timm_out(out)
    arch = timm_arch(model.visual)
    state = timm_state_dict(model.visual)
    with torch.device("meta"):
        reference = timm.create_model(arch.model_name, pretrained=False, **arch.kwargs)
    check_against(state, reference, f"timm '{arch.model_name}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = data_config(image_size(model.visual))
    overlay = {"file": str(out.resolve()), **data, "num_classes": TIMM_NUM_CLASSES, "classifier": "head"}
    head_note = (
        f"head.weight/head.bias are an all-zero {TIMM_NUM_CLASSES}-class placeholder (pre-training trains no "
        "classifier); pass num_classes=0 for features or num_classes=N to get a fresh head"
    )
    metadata = {
        "format": "pt",
        "harmony.export": "timm",
        "timm.model_name": arch.model_name,
        "timm.kwargs": json.dumps(arch.kwargs),
        "timm.data_config": json.dumps(data),
        "classifier": head_note,
    }
    _save_safetensors(state, out, metadata)
    sidecar = out.with_suffix(".json")
    recipe = {
        "architecture": arch.model_name,
        "num_classes": TIMM_NUM_CLASSES,
        "num_features": model.visual.embed_dim,
        "model_args": arch.kwargs,
        "pretrained_cfg": {**data, "num_classes": TIMM_NUM_CLASSES, "classifier": "head"},
        "create_model": {
            "model_name": arch.model_name,
            "pretrained": True,
            **arch.kwargs,
            "pretrained_cfg_overlay": overlay,
        },
        "python": _python_call(arch.model_name, arch.kwargs, overlay),
        "classifier_head": head_note,
        "harmony": {**(provenance or {}), "vision": model.visual.size_name},
    }
    sidecar.write_text(json.dumps(recipe, indent=2) + "\n")
    return [out, sidecar]


def open_clip_model_config(model: ImageTextModel, native: bool, logit_bias: float | None = None) -> dict[str, Any]:
    """open_clip's `model_cfg` for our pair: the image tower as a timm trunk by name with CLS pooling and a
    bias-free projection, or (`native`) as open_clip's own ViT; the text tower pooled at end-of-text."""
    text = model.text
    assert text is not None
    spec = TEXT_SIZES[text.size_name]
    bias = {} if logit_bias is None else {"init_logit_bias": logit_bias}
    vision_cfg = (
        native_vision(model)[0]
        if native
        else {
            "image_size": image_size(model.visual),
            "timm_model_name": timm_arch(model.visual).model_name,
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": "linear",
            "timm_proj_bias": False,
        }
    )
    return {
        "embed_dim": model.visual_projection.out_features,
        **bias,
        "quick_gelu": False,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": spec.width,
            "heads": spec.heads,
            "layers": spec.layers,
            "pad_id": 0,
            "pool_type": "eos",
            "eos_id": text.eot_id,
        },
    }


def export_open_clip(
    model: ImageTextModel, out: Path, provenance: dict[str, Any] | None = None, logit_bias: float | None = None
) -> list[Path]:
    """Write an open_clip `local-dir:` folder with both towers. It holds everything it needs, so it may be
    copied or moved: a size timm names at its default resolution keeps the timm trunk (its weights load into
    timm unchanged); any other goes in as open_clip's own ViT (`native_vision`)."""
    import open_clip

    if model.text is None:
        raise ExportError("--format open_clip needs a text tower; these weights have none")
    native = bool(timm_arch(model.visual).kwargs)
    out.mkdir(parents=True, exist_ok=True)
    size = image_size(model.visual)
    model_cfg = open_clip_model_config(model, native, logit_bias)
    state = open_clip_state_dict(model, logit_bias, native)
    with torch.device("meta"):
        reference = open_clip.model.CLIP(**model_cfg)
    check_against(state, reference, "open_clip CLIP")
    _save_safetensors(state, out / OPEN_CLIP_WEIGHTS, {"format": "pt", "harmony.export": "open_clip"})
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "interpolation": "bilinear",
            "resize_mode": "shortest",
        },
        "harmony": {**(provenance or {}), "vision": model.visual.size_name, "text": model.text.size_name},
    }
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return [out / OPEN_CLIP_WEIGHTS, out / OPEN_CLIP_CONFIG]


def no_text_tower(pretrained: Pretrained) -> str:
    """Why the loaded weights have no text tower, and what to export instead."""
    from harmony.objectives.registry import needs_for_config

    if needs_for_config(pretrained.config).needs_text:
        return "--format open_clip needs a text tower; this run's teacher has none: export it with --weights student"
    return (
        f"--format open_clip needs a text tower; method {pretrained.config.name} trains none: export the image "
        "tower with --format timm"
    )


def cmd_export(args: argparse.Namespace) -> int:
    from harmony.loading import load
    from harmony.outputs import OutputError, check_output_dir, check_output_file

    out = Path(args.out)
    if args.format == "timm":  # all before the (slow) checkpoint load
        check_timm_out(out)
        check_output_file(out)
        taken = [p for p in (out, out.with_suffix(".json")) if p.exists()]
    else:
        check_output_dir(out)
        taken = sorted(out.iterdir()) if out.is_dir() else []
    if taken and not args.overwrite:
        names = ", ".join(str(p) for p in taken[:3]) + (", ..." if len(taken) > 3 else "")
        raise OutputError(f"--out {out}: {names} already exist(s); give --overwrite to replace an earlier export")
    pretrained = load(args.checkpoint, weights=args.weights)
    if args.format == "open_clip" and pretrained.model.text is None:
        raise ExportError(no_text_tower(pretrained))
    provenance = {
        "checkpoint": str(pretrained.path.resolve()),
        "weights": pretrained.weights,
        "step": pretrained.step,
        "method": pretrained.config.name,
    }
    if args.format == "timm":
        written = export_timm(pretrained.model, out, provenance)
        usage = json.loads(written[1].read_text())["python"]
    else:
        written = export_open_clip(pretrained.model, out, provenance, pretrained.logit_bias)
        usage = f"open_clip.create_model_and_transforms('local-dir:{out.resolve()}')"
    print(f"exported the {pretrained.weights} weights (step {pretrained.step}) for {args.format}:")
    for path in written:
        print(f"  {path}")
    print(f"load with: {usage}")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export encoders for timm or open_clip",
        description="Write a checkpoint's vision tower for timm, or both towers for open_clip (safetensors).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument(
        "--format", required=True, choices=["timm", "open_clip"], help="timm: vision tower; open_clip: both towers"
    )
    p.add_argument("--out", required=True, help="timm: a .safetensors file (+ .json sidecar); open_clip: a folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.add_argument(
        "--weights",
        choices=["auto", "student", "teacher"],
        default="auto",
        help="auto: the EMA teacher where it has every tower, else the student",
    )
    p.set_defaults(func=cmd_export)
