"""Both towers for open_clip: a folder for its `local-dir:` schema (`open_clip_config.json` +
`open_clip_model.safetensors`) that holds everything it needs, so it may be moved or copied.

The image tower stays a timm trunk (pooled at the class token, bias-free linear projection) where timm names
its architecture at its default resolution, so its weights also load into timm unchanged; any other goes in as
open_clip's own ViT, exactly: a LayerNorm before the blocks where the tower has one, and otherwise the patch
embedding's bias (a constant added to every patch token) moved into the patch rows of the position table, as
open_clip's patch convolution has none. The text tower is CLIP's, pooled at the end-of-text id
(`pool_type='eos'`), not by argmax, which would pick the `[MASK]` id; SigLIP's bias is open_clip's
`logit_bias`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from harmony.export.common import ExportError, check_against, cpu, image_size, save_safetensors, vit_of
from harmony.export.to_timm import timm_arch
from harmony.models.normalize import IMAGENET_MEAN, IMAGENET_STD
from harmony.models.pair import ImageTextModel

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
BLOCK_NAMES = {
    "norm1": "ln_1",
    "norm2": "ln_2",
    "attn.qkv": "attn.in_proj",
    "attn.proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def native_vision(model: ImageTextModel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """open_clip's own ViT (`vision_cfg`, `visual.*` weights) holding our vision tower exactly (module doc)."""
    vit, spec = vit_of(model).vit, vit_of(model).spec
    vision_cfg: dict[str, Any] = {
        "image_size": image_size(vit_of(model)),
        "layers": spec.depth,
        "width": spec.embed_dim,
        "head_width": spec.embed_dim // spec.num_heads,
        "mlp_ratio": spec.mlp_ratio,
        "patch_size": spec.patch_size,
        "no_ln_pre": not spec.pre_norm,
        "pool_type": "tok",
        "final_ln_after_pool": False,
        "norm_kwargs": {"eps": spec.norm_eps},
    }
    if spec.layer_scale is not None:
        vision_cfg["ls_init_value"] = spec.layer_scale
    own = cpu(vit.state_dict())
    positions = own["pos_embed"][0].clone()
    if not spec.pre_norm:
        positions[1:] += own["patch_embed.proj.bias"]
    state = {
        "visual.conv1.weight": own["patch_embed.proj.weight"],
        "visual.class_embedding": own["cls_token"].reshape(-1),
        "visual.positional_embedding": positions,
        "visual.ln_post.weight": own["norm.weight"],
        "visual.ln_post.bias": own["norm.bias"],
        "visual.proj": model.visual_projection.weight.detach().cpu().t().contiguous(),
    }
    if spec.pre_norm:
        state["visual.ln_pre.weight"], state["visual.ln_pre.bias"] = own["norm_pre.weight"], own["norm_pre.bias"]
    for i in range(spec.depth):
        block = f"visual.transformer.resblocks.{i}"
        for ours, theirs in BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"{block}.{theirs}_{kind}" if theirs == "attn.in_proj" else f"{block}.{theirs}.{kind}"
                state[key] = own[f"blocks.{i}.{ours}.{kind}"]
        if spec.layer_scale is not None:
            state[f"{block}.ls_1.gamma"], state[f"{block}.ls_2.gamma"] = (
                own[f"blocks.{i}.ls1.gamma"],
                own[f"blocks.{i}.ls2.gamma"],
            )
    return vision_cfg, state


def timm_trunk(model: ImageTextModel) -> bool:
    """Whether the image tower goes in as a timm trunk: timm names it, at that name's own resolution."""
    return vit_of(model).spec.timm_name is not None and not timm_arch(vit_of(model)).kwargs


def open_clip_state_dict(
    model: ImageTextModel, logit_bias: float | None = None, native: bool = False
) -> dict[str, torch.Tensor]:
    """Both towers under open_clip's CLIP names (the text tower already uses them), the image tower as a timm
    trunk or, with `native`, as open_clip's own ViT."""
    assert model.text is not None
    if native:
        state = native_vision(model)[1]
    else:
        state = {f"visual.trunk.{k}": v for k, v in cpu(vit_of(model).vit.state_dict()).items()}
        state["visual.head.proj.weight"] = model.visual_projection.weight.detach().cpu().contiguous()
    state.update(cpu(model.text.state_dict()))
    state["text_projection"] = model.text_projection.detach().cpu().contiguous()
    # open_clip keeps a 0-d scale and does not clamp it: store ours clamped, as `model.scale()` uses it
    state["logit_scale"] = model.logit_scale.detach().cpu().clamp(max=math.log(model.logit_scale_max)).reshape(())
    if logit_bias is not None:
        state["logit_bias"] = torch.tensor(logit_bias)
    return state


def open_clip_model_config(model: ImageTextModel, native: bool, logit_bias: float | None = None) -> dict[str, Any]:
    """open_clip's `model_cfg` for our pair (module doc)."""
    text = model.text
    assert text is not None
    vision, spec = vit_of(model).spec, text.spec
    if vision.act != spec.act:
        raise ExportError(
            f"open_clip has one activation for both towers; this image tower uses {vision.act} and the text tower "
            f"{spec.act}: export them with --format hf, or the image tower with --format timm"
        )
    vision_cfg = (
        native_vision(model)[0]
        if native
        else {
            "image_size": image_size(vit_of(model)),
            "timm_model_name": timm_arch(vit_of(model)).model_name,
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": "linear",
            "timm_proj_bias": False,
        }
    )
    text_cfg: dict[str, Any] = {
        "context_length": text.context_length,
        "vocab_size": text.vocab_size,
        "width": spec.width,
        "heads": spec.heads,
        "layers": spec.layers,
        "mlp_ratio": spec.mlp_ratio,
        "pad_id": 0,
        "pool_type": "eos",
        "eos_id": text.eot_id,
    }
    if spec.norm_eps != 1e-5:
        text_cfg["norm_kwargs"] = {"eps": spec.norm_eps}
    bias = {} if logit_bias is None else {"init_logit_bias": logit_bias}
    return {
        "embed_dim": model.visual_projection.out_features,
        **bias,
        "quick_gelu": spec.act == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }


def export_open_clip(
    model: ImageTextModel, out: Path, provenance: dict[str, Any] | None = None, logit_bias: float | None = None
) -> list[Path]:
    """Write an open_clip `local-dir:` folder with both towers (module doc)."""
    import open_clip

    if model.text is None:
        raise ExportError("--format open_clip needs a text tower; these weights have none")
    native = not timm_trunk(model)
    out.mkdir(parents=True, exist_ok=True)
    size = image_size(vit_of(model))
    model_cfg = open_clip_model_config(model, native, logit_bias)
    state = open_clip_state_dict(model, logit_bias, native)
    with torch.device("meta"):
        reference = open_clip.model.CLIP(**model_cfg)
    check_against(state, reference, "open_clip CLIP")
    save_safetensors(state, out / OPEN_CLIP_WEIGHTS, {"format": "pt", "harmony.export": "open_clip"})
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "interpolation": "bilinear",
            "resize_mode": "shortest",
        },
        "harmony": dict(provenance or {}),
    }
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return [out / OPEN_CLIP_WEIGHTS, out / OPEN_CLIP_CONFIG]
