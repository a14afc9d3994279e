"""A transformers folder (`save_pretrained` layout) that `from_pretrained(dir)` loads offline, with the
model's features: `CLIPModel` for both towers, `CLIPVisionModel` for an image tower alone, both for CLIP's
architecture (a LayerNorm before the blocks, as OpenAI's, open_clip's and transformers' CLIP towers have); a
plain ViT alone (Harmony's own sizes) as a `ViTModel`, whose class token after the final LayerNorm is the
tower's output (`last_hidden_state[:, 0]`; its pooler is not part of the export). A plain ViT with a text
tower has no exact transformers class (`CLIPModel` always normalises before the blocks): it is refused. The
folder also holds CLIP's tokenizer with the `[MASK]` id, and `harmony_export.json` with the provenance.
transformers' module names are read from the installed version's own model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from harmony.export.common import ExportError, check_against, cpu, image_size, readable, vit_of
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer
from harmony.weights.hf_source import TEXT_BLOCK_NAMES


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ExportError("--format hf needs transformers: pip install 'harmony-vl[hf]'") from None
    return transformers


def _split_qkv(weight: torch.Tensor) -> list[torch.Tensor]:
    return list(weight.chunk(3))


def clip_vision_state(model: ImageTextModel) -> dict[str, torch.Tensor]:
    """The image tower under transformers' CLIP vision names (relative to the vision model)."""
    own, spec = cpu(vit_of(model).vit.state_dict()), vit_of(model).spec
    out = {
        "embeddings.class_embedding": own["cls_token"].reshape(-1),
        "embeddings.patch_embedding.weight": own["patch_embed.proj.weight"],
        "embeddings.position_embedding.weight": own["pos_embed"][0],
    }
    for ours, theirs in (("norm_pre", "pre_layrnorm"), ("norm", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = own[f"{ours}.{kind}"]
    for i in range(spec.depth):
        block, layer = f"blocks.{i}", f"encoder.layers.{i}"
        for kind in ("weight", "bias"):
            for name, part in zip(("q", "k", "v"), _split_qkv(own[f"{block}.attn.qkv.{kind}"])):
                out[f"{layer}.self_attn.{name}_proj.{kind}"] = part
            for ours, theirs in (
                ("attn.proj", "self_attn.out_proj"),
                ("norm1", "layer_norm1"),
                ("norm2", "layer_norm2"),
            ):
                out[f"{layer}.{theirs}.{kind}"] = own[f"{block}.{ours}.{kind}"]
            for fc in ("fc1", "fc2"):
                out[f"{layer}.mlp.{fc}.{kind}"] = own[f"{block}.mlp.{fc}.{kind}"]
    return out


def clip_text_state(model: ImageTextModel) -> dict[str, torch.Tensor]:
    """The text tower under transformers' CLIP text names (relative to the text model)."""
    assert model.text is not None
    own = cpu(model.text.state_dict())
    out = {
        "embeddings.token_embedding.weight": own["token_embedding.weight"],
        "embeddings.position_embedding.weight": own["positional_embedding"],
        "final_layer_norm.weight": own["ln_final.weight"],
        "final_layer_norm.bias": own["ln_final.bias"],
    }
    for i in range(model.text.spec.layers):
        block, layer = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
        for kind in ("weight", "bias"):
            for name, part in zip(("q", "k", "v"), _split_qkv(own[f"{block}.attn.in_proj_{kind}"])):
                out[f"{layer}.self_attn.{name}_proj.{kind}"] = part
            for ours, hf in TEXT_BLOCK_NAMES:
                out[f"{layer}.{hf}.{kind}"] = own[f"{block}.{ours}.{kind}"]
    return out


def vit_state(model: ImageTextModel, keys: set[str]) -> dict[str, torch.Tensor]:
    """A plain ViT under transformers' `ViTModel` names, in the installed version's spelling (`keys`)."""
    own, spec = cpu(vit_of(model).vit.state_dict()), vit_of(model).spec
    out = {
        "embeddings.cls_token": own["cls_token"],
        "embeddings.position_embeddings": own["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": own["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": own["patch_embed.proj.bias"],
        "layernorm.weight": own["norm.weight"],
        "layernorm.bias": own["norm.bias"],
    }
    new_names = "layers.0.attention.q_proj.weight" in keys
    for i in range(spec.depth):
        block = f"blocks.{i}"
        if new_names:
            layer = f"layers.{i}"
            names = {"attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
            qkv = [f"{layer}.attention.{n}_proj" for n in ("q", "k", "v")]
        else:
            layer = f"encoder.layer.{i}"
            names = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
            qkv = [f"{layer}.attention.attention.{n}" for n in ("query", "key", "value")]
        names |= {"norm1": "layernorm_before", "norm2": "layernorm_after"}
        for kind in ("weight", "bias"):
            for name, part in zip(qkv, _split_qkv(own[f"{block}.attn.qkv.{kind}"])):
                out[f"{name}.{kind}"] = part
            for ours, theirs in names.items():
                out[f"{layer}.{theirs}.{kind}"] = own[f"{block}.{ours}.{kind}"]
    return out


def _prefixed(state: dict[str, torch.Tensor], prefix: str, keys: set[str]) -> dict[str, torch.Tensor]:
    """`state` under `prefix` when the installed version's model has it there, else as it is."""
    return {f"{prefix}{k}": v for k, v in state.items()} if any(k.startswith(prefix) for k in keys) else state


def _hf_model(model: ImageTextModel) -> tuple[Any, dict[str, torch.Tensor], str]:
    """(the transformers model on the meta device, our weights under its names, its class name)."""
    tf = _transformers()
    spec = vit_of(model).spec
    if spec.layer_scale is not None:
        raise ExportError("transformers' CLIP and ViT have no LayerScale; export this tower with --format timm")
    vision = {
        "hidden_size": spec.embed_dim,
        "intermediate_size": int(spec.embed_dim * spec.mlp_ratio),
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "image_size": image_size(vit_of(model)),
        "patch_size": spec.patch_size,
        "hidden_act": spec.act,
        "layer_norm_eps": spec.norm_eps,
    }
    if model.text is not None:
        if not spec.pre_norm:
            raise ExportError(
                "transformers' CLIPModel normalises before the ViT blocks, which this image tower (a plain ViT) does "
                "not: no transformers class holds this pair exactly; export it with --format open_clip, or the image "
                "tower alone with --format hf --weights ... of an image-only run, or --format timm"
            )
        text = model.text.spec
        config = tf.CLIPConfig(
            vision_config=vision,
            text_config={
                "vocab_size": model.text.vocab_size,
                "hidden_size": text.width,
                "intermediate_size": int(text.width * text.mlp_ratio),
                "num_hidden_layers": text.layers,
                "num_attention_heads": text.heads,
                "max_position_embeddings": model.text.context_length,
                "hidden_act": text.act,
                "layer_norm_eps": text.norm_eps,
                "bos_token_id": model.text.eot_id - 1,
                "eos_token_id": model.text.eot_id,
                "pad_token_id": model.text.eot_id,
            },
            projection_dim=model.visual_projection.out_features,
        )
        with torch.device("meta"):
            hf = tf.CLIPModel(config)
        keys = set(hf.state_dict())
        state = {f"vision_model.{k}": v for k, v in clip_vision_state(model).items()}
        state |= {f"text_model.{k}": v for k, v in clip_text_state(model).items()}
        state["visual_projection.weight"] = model.visual_projection.weight.detach().cpu()
        state["text_projection.weight"] = model.text_projection.detach().cpu().t().contiguous()
        scale = model.logit_scale.detach().cpu().clamp(max=math.log(model.logit_scale_max))
        state["logit_scale"] = scale.reshape(())
        return hf, state, "CLIPModel"
    if spec.pre_norm:
        with torch.device("meta"):
            hf = tf.CLIPVisionModel(tf.CLIPVisionConfig(**vision))
        keys = set(hf.state_dict())
        return hf, _prefixed(clip_vision_state(model), "vision_model.", keys), "CLIPVisionModel"
    config = tf.ViTConfig(**{**vision, "layer_norm_eps": spec.norm_eps, "qkv_bias": True})
    with torch.device("meta"):
        hf = tf.ViTModel(config, add_pooling_layer=False)
    return hf, vit_state(model, set(hf.state_dict())), "ViTModel"


def export_hf(
    model: ImageTextModel, out: Path, provenance: dict[str, Any] | None = None, logit_bias: float | None = None
) -> list[Path]:
    """Write the transformers folder (module doc); returns the files written."""
    hf, state, kind = _hf_model(model)
    check_against(state, hf, f"transformers {kind}")
    hf.load_state_dict(state, assign=True)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    notes = {"class": kind, **(provenance or {})}
    if logit_bias is not None:
        notes["left_out"] = f"SigLIP's logit bias {logit_bias:.6g}: transformers' CLIPModel has no place for it"
    if model.text is not None:
        save_tokenizer(out, model.text.context_length)
    (out / "harmony_export.json").write_text(json.dumps(notes, indent=2) + "\n")
    written = sorted(p for p in out.iterdir() if p.is_file())
    for path in written:
        readable(path)
    return written


def save_tokenizer(out: Path, context_length: int) -> None:
    """CLIP's BPE as a transformers `CLIPTokenizer` (vocabulary and merges from open_clip's bundled file), with
    Harmony's `[MASK]` as one more id."""
    tf = _transformers()
    bpe = CaptionTokenizer(context_length)._bpe
    vocab = out / "vocab.json"
    merges = out / "merges.txt"
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's -> CLIP's own
    vocab.write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}, ensure_ascii=False))
    ranked = sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])
    merges.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in ranked), encoding="utf-8")
    tokenizer = tf.CLIPTokenizer(str(vocab), str(merges), model_max_length=context_length, pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    tokenizer.save_pretrained(str(out))
