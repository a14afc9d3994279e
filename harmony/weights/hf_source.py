"""Hugging Face `transformers` CLIP weights, both towers: a `CLIPModel` folder (`config.json` +
`model.safetensors` or `pytorch_model.bin`, as `save_pretrained` writes), or `hf-hub:ORG/NAME` found in the
local Hugging Face cache (nothing is downloaded). Read from the files alone: `transformers` is not needed.

HF's CLIP vision tower is OpenAI's (a LayerNorm before the blocks, a patch convolution without bias), its
attention keeps q, k and v apart (concatenated here into the ViT's one projection), its final LayerNorm is
applied to the pooled class token only (the same token: LayerNorm works token by token)."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch

from harmony.core.errors import CheckpointError
from harmony.models.sizes import TextSize
from harmony.weights.source import CLIP_VOCAB, Source, State, flat_tensors, read_state
from harmony.weights.timm_source import vit_weights
from harmony.weights.vit import image_size_of, meta_vit, vision_size_of

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def is_hf_clip(folder: Path) -> bool:
    """A folder whose config.json is a transformers CLIP config."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") in ("clip", "clip_vision_model")


def hub_folder(repo: str) -> Path:
    """The newest snapshot of `ORG/NAME` in the local Hugging Face cache; a one-line error naming the files to
    fetch when it is not there (nothing is downloaded)."""
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = cache.expanduser() / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    usable = [p.parent for p in found if any((p.parent / f).exists() for f in WEIGHT_FILES)]
    if not usable:
        raise CheckpointError(
            f"--init hf-hub:{repo}: not in the local Hugging Face cache ({cache}); nothing is downloaded: fetch it "
            f"first, e.g. `huggingface-cli download {repo} config.json model.safetensors`"
        )
    return usable[-1]


def folder(root: Path, label: str | None = None) -> Source:
    """A transformers `CLIPModel` (or `CLIPVisionModel`) folder."""
    what = f"--init {label or root}"
    config: dict[str, Any] = json.loads((root / "config.json").read_text())
    weights = next((root / f for f in WEIGHT_FILES if (root / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{what}: no weights beside config.json (looked for {', '.join(WEIGHT_FILES)})")
    vision_only = config.get("model_type") == "clip_vision_model"
    vision_cfg = config if vision_only else config.get("vision_config", {})
    vit = _vision(vision_cfg, what)
    text = None if vision_only else _text_size(config.get("text_config", {}), what)

    def load() -> State:
        state = flat_tensors(read_state(weights, what))
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
        out = vit_weights(_vision_to_timm(state, prefix), vit, what)
        if "visual_projection.weight" in state:
            out["visual_projection.weight"] = state["visual_projection.weight"]
        if text is not None:
            out.update(_text_to_ours(state, text.layers))
            out["text_projection"] = state["text_projection.weight"].t().contiguous()
            out["logit_scale"] = state["logit_scale"].reshape(1)
        return out

    text_cfg = config.get("text_config", {})
    return Source(
        label=label or f"hf:{root}",
        weights=load,
        vision=vision_size_of(vit, what),
        image_size=image_size_of(vit),
        text=text,
        context_length=None if text is None else int(text_cfg.get("max_position_embeddings", 77)),
        vocab_size=None if text is None else int(text_cfg.get("vocab_size", CLIP_VOCAB)),
        embed_dim=None if vision_only else int(config.get("projection_dim", 512)),
    )


def _activation(cfg: dict[str, Any], what: str) -> str:
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{what}: its activation '{act}' is neither GELU nor QuickGELU")
    return ACTIVATIONS[act]


def _vision(cfg: dict[str, Any], what: str) -> Any:
    width = int(cfg.get("hidden_size", 768))
    kwargs: dict[str, Any] = {
        "img_size": int(cfg.get("image_size", 224)),
        "patch_size": int(cfg.get("patch_size", 32)),
        "embed_dim": width,
        "depth": int(cfg.get("num_hidden_layers", 12)),
        "num_heads": int(cfg.get("num_attention_heads", 12)),
        "mlp_ratio": int(cfg.get("intermediate_size", 3072)) / width,
        "pre_norm": True,
        "num_classes": 0,
        "norm_layer": partial(torch.nn.LayerNorm, eps=float(cfg.get("layer_norm_eps", 1e-5))),
    }
    if _activation(cfg, what) == "quick_gelu":
        kwargs["act_layer"] = "quick_gelu"
    return meta_vit(**kwargs)


def _text_size(cfg: dict[str, Any], what: str) -> TextSize:
    if int(cfg.get("vocab_size", CLIP_VOCAB)) != CLIP_VOCAB:
        raise CheckpointError(f"{what}: its vocabulary has {cfg['vocab_size']} entries, not CLIP's BPE (49,408)")
    width = int(cfg.get("hidden_size", 512))
    return TextSize(
        width=width,
        layers=int(cfg.get("num_hidden_layers", 12)),
        heads=int(cfg.get("num_attention_heads", 8)),
        mlp_ratio=int(cfg.get("intermediate_size", 2048)) / width,
        act=_activation(cfg, what),  # type: ignore[arg-type]
        norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
    )


def _qkv(state: State, attn: str, kind: str) -> torch.Tensor:
    return torch.cat([state[f"{attn}.{p}_proj.{kind}"] for p in ("q", "k", "v")])


def _vision_to_timm(state: State, prefix: str) -> State:
    """HF CLIP vision names -> timm's ViT names."""
    out = {
        "cls_token": state[f"{prefix}embeddings.class_embedding"].reshape(1, 1, -1),
        "patch_embed.proj.weight": state[f"{prefix}embeddings.patch_embedding.weight"],
        "pos_embed": state[f"{prefix}embeddings.position_embedding.weight"].unsqueeze(0),
    }
    for hf, timm_name in (("pre_layrnorm", "norm_pre"), ("post_layernorm", "norm")):
        for kind in ("weight", "bias"):
            out[f"{timm_name}.{kind}"] = state[f"{prefix}{hf}.{kind}"]
    layers = f"{prefix}encoder.layers."
    depth = 1 + max(int(k[len(layers) :].split(".")[0]) for k in state if k.startswith(layers))
    for i in range(depth):
        layer, block = f"{prefix}encoder.layers.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{block}.attn.qkv.{kind}"] = _qkv(state, f"{layer}.self_attn", kind)
            for hf, ours in (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
                out[f"{block}.{ours}.{kind}"] = state[f"{layer}.{hf}.{kind}"]
            for fc in ("fc1", "fc2"):
                out[f"{block}.mlp.{fc}.{kind}"] = state[f"{layer}.mlp.{fc}.{kind}"]
    return out


# a text block's tensors besides the fused q/k/v: (Harmony's / open_clip's name, transformers' CLIP name)
TEXT_BLOCK_NAMES = (
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def _text_to_ours(state: State, layers: int) -> State:
    """HF CLIP text names -> Harmony's (open_clip's) text tower names, under `text.`."""
    p = "text_model."
    out = {
        "text.token_embedding.weight": state[f"{p}embeddings.token_embedding.weight"],
        "text.positional_embedding": state[f"{p}embeddings.position_embedding.weight"],
    }
    for kind in ("weight", "bias"):
        out[f"text.ln_final.{kind}"] = state[f"{p}final_layer_norm.{kind}"]
    for i in range(layers):
        layer, block = f"{p}encoder.layers.{i}", f"text.transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{block}.attn.in_proj_{kind}"] = _qkv(state, f"{layer}.self_attn", kind)
            for ours, hf in TEXT_BLOCK_NAMES:
                out[f"{block}.{ours}.{kind}"] = state[f"{layer}.{hf}.{kind}"]
    return out
