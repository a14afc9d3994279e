"""open_clip weights, both towers: `open_clip:MODEL_NAME:FILE` (one of open_clip's built-in configs, e.g.
`ViT-B-16`, or `ViT-B-16-quickgelu` for OpenAI's weights) and an open_clip local folder
(`open_clip_config.json` + `open_clip_model.safetensors`, as `harmony export --format open_clip` writes).

open_clip's image tower is either its own ViT (read through timm's converter of OpenAI's layout) or a timm
trunk; its text tower is CLIP's, under the names Harmony's text tower already uses."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import _convert_openai_clip

from harmony.core.errors import CheckpointError
from harmony.models.sizes import TextSize
from harmony.weights.source import CLIP_VOCAB, Source, State, flat_tensors, read_state
from harmony.weights.timm_source import vit_weights
from harmony.weights.vit import image_size_of, meta_vit, vision_size_of

CONFIG = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors")
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")


def named(name: str, path: Path) -> Source:
    """`open_clip:MODEL_NAME:FILE`: a built-in open_clip config and a weights file."""
    import open_clip

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise CheckpointError(
            f"--init open_clip:{name}:{path}: open_clip has no model '{name}' (open_clip.list_models())"
        )
    return _source(f"open_clip:{name}", model_cfg, path, f"--init open_clip:{name}:{path}")


def folder(root: Path) -> Source:
    """An open_clip local folder."""
    what = f"--init {root}"
    config = json.loads((root / CONFIG).read_text())
    model_cfg = config.get("model_cfg", config)
    weights = next((root / f for f in WEIGHT_FILES if (root / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{what}: no weights beside {CONFIG} (looked for {', '.join(WEIGHT_FILES[:2])})")
    return _source(f"open_clip:{root}", model_cfg, weights, what)


def _source(label: str, model_cfg: dict[str, Any], path: Path, what: str) -> Source:
    vision_cfg, text_cfg = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    text = _text_size(text_cfg, quick_gelu, what)
    if vision_cfg.get("timm_model_name"):
        vision = _timm_trunk(vision_cfg, what)
    else:
        vision = _native_vit(vision_cfg, quick_gelu, what)
    vit, convert = vision

    def weights() -> State:
        state = flat_tensors(read_state(path, what))
        out = convert(state)
        out.update({f"text.{k}": v for k, v in state.items() if k.startswith(TEXT_KEYS)})
        out["text_projection"] = state["text_projection"]
        out["logit_scale"] = state["logit_scale"].reshape(1)
        return out

    return Source(
        label=label,
        weights=weights,
        vision=vision_size_of(vit, what),
        image_size=image_size_of(vit),
        text=text,
        context_length=int(text_cfg.get("context_length", 77)),
        vocab_size=int(text_cfg.get("vocab_size", CLIP_VOCAB)),
        embed_dim=int(model_cfg["embed_dim"]),
    )


def _text_size(cfg: dict[str, Any], quick_gelu: bool, what: str) -> TextSize:
    """The text tower's architecture; what Harmony's CLIP text tower cannot be is refused by name."""
    refusals = {
        "hf_model_name": "a Hugging Face text model",
        "hf_tokenizer_name": "another tokenizer than CLIP's BPE",
        "ls_init_value": "LayerScale in the text tower",
        "embed_cls": "a learnt class token in the text tower",
        "no_causal_mask": "bidirectional text attention",
        "proj_bias": "a text projection with bias",
    }
    for key, feature in refusals.items():
        if cfg.get(key):
            raise CheckpointError(f"{what}: its text tower has {feature}, which Harmony's does not have")
    if cfg.get("proj_type", "linear") != "linear" or cfg.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise CheckpointError(f"{what}: its text tower pools or projects otherwise than at end-of-text, linearly")
    if int(cfg.get("vocab_size", CLIP_VOCAB)) not in (CLIP_VOCAB, CLIP_VOCAB + 1):
        raise CheckpointError(f"{what}: its vocabulary has {cfg['vocab_size']} entries, not CLIP's BPE (49,408)")
    width = int(cfg.get("width", 512))
    return TextSize(
        width=width,
        layers=int(cfg.get("layers", 12)),
        heads=int(cfg.get("heads", 8)),
        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
        act="quick_gelu" if quick_gelu else "gelu",
        norm_eps=float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5)),
    )


def _native_vit(cfg: dict[str, Any], quick_gelu: bool, what: str) -> tuple[Any, Any]:
    """open_clip's own ViT as a timm ViT, and the conversion of its weights (timm's, for OpenAI's layout)."""
    if (
        cfg.get("attentional_pool")
        or cfg.get("pool_type", "tok") != "tok"
        or cfg.get("pos_embed_type", "learnable") != "learnable"
    ):
        raise CheckpointError(f"{what}: its image tower pools otherwise than at the class token")
    width, no_ln_pre = int(cfg.get("width", 768)), bool(cfg.get("no_ln_pre", False))
    kwargs: dict[str, Any] = {
        "img_size": int(cfg.get("image_size", 224)),
        "patch_size": int(cfg.get("patch_size", 16)),
        "embed_dim": width,
        "depth": int(cfg.get("layers", 12)),
        "num_heads": width // int(cfg.get("head_width", 64)),
        "mlp_ratio": float(cfg.get("mlp_ratio", 4.0)),
        "pre_norm": not no_ln_pre,
        "num_classes": 0,
        "norm_layer": partial(torch.nn.LayerNorm, eps=float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))),
    }
    if quick_gelu:
        kwargs["act_layer"] = "quick_gelu"
    if cfg.get("ls_init_value") is not None:
        kwargs["init_values"] = float(cfg["ls_init_value"])
    vit = meta_vit(**kwargs)

    def convert(state: State) -> State:
        converted = _convert_openai_clip(state, vit, prefix="visual.")
        converted = {k.replace(".ls_1.", ".ls1.").replace(".ls_2.", ".ls2."): v for k, v in converted.items()}
        if no_ln_pre:  # open_clip's patch convolution has no bias: a zero bias is the same function
            converted["patch_embed.proj.bias"] = torch.zeros(width)
        out = vit_weights(converted, vit, what)
        out["visual_projection.weight"] = converted["head.weight"]
        return out

    return vit, convert


def _timm_trunk(cfg: dict[str, Any], what: str) -> tuple[Any, Any]:
    """A timm trunk pooled at the class token with a bias-free linear projection (as Harmony's export writes)."""
    if (
        cfg.get("timm_pool", "avg") != "token"
        or cfg.get("timm_proj", "linear") != "linear"
        or cfg.get("timm_proj_bias")
    ):
        raise CheckpointError(
            f"{what}: its timm image tower pools with '{cfg.get('timm_pool', 'avg')}' or projects otherwise than "
            "linearly without bias; Harmony pools at the class token"
        )
    name = str(cfg["timm_model_name"])
    vit = meta_vit(name, num_classes=0)

    def convert(state: State) -> State:
        trunk = {k[len("visual.trunk.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
        out = vit_weights(trunk, vit, what)
        out["visual_projection.weight"] = state["visual.head.proj.weight"]
        return out

    return vit, convert
