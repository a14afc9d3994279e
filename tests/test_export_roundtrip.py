"""Weights the other way: a tower started from another library's weights, exported back to timm, open_clip
and transformers, gives the same features there; a plain ViT (Harmony's own sizes) goes to transformers as a
`ViTModel`; the exported CLIP tokenizer gives Harmony's ids."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from harmony.core.distributed import DistInfo
from harmony.export.common import ExportError
from harmony.export.to_hf import export_hf
from harmony.export.to_open_clip import export_open_clip
from harmony.export.to_timm import export_timm
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer
from harmony.presets import build_config
from harmony.train.cli import with_init
from harmony.train.step import Stepper

transformers = pytest.importorskip("transformers")
# transformers' CLIP tokenizer keeps typographic quotes that CLIP's reference tokenizer (open_clip's, which
# Harmony's is) straightens, and reads a literal "[MASK]" as the mask id: neither is in these captions
CAPTIONS = [
    "a photo of a dog",
    "two blue circles on a green background " * 9,
    "Ünïcödé café naïve 一只猫",
    "wow !$ 3.5 cm",
]


def student(preset: str, *overrides: str) -> ImageTextModel:
    cfg, init = with_init(build_config(preset, list(overrides)))
    return Stepper(cfg, torch.device("cpu"), DistInfo(), init).task.student.eval()


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


SMALL_OPENAI = {  # OpenAI's architecture (LayerNorm before the blocks, QuickGELU, eps 1e-5), small
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
}


@torch.no_grad()
def test_a_clip_architecture_goes_back_to_open_clip_and_transformers(tmp_path: Path) -> None:
    source = open_clip.model.CLIP(**SMALL_OPENAI)
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL_OPENAI}))
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()},
        str(tmp_path / "source" / "open_clip_model.safetensors"),
    )
    ours = student("clip-tiny-test", f"model.init={tmp_path / 'source'}")
    assert ours.visual.spec.pre_norm and ours.text is not None and ours.text.spec.act == "quick_gelu"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = CaptionTokenizer(77)(CAPTIONS)
    image, text = ours.encode_image(x), ours.encode_text(ids)
    close(image, F.normalize(source.encode_image(x), dim=-1))

    export_open_clip(ours, tmp_path / "oc")
    back = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    close(back.encode_image(x, normalize=True), image)
    close(back.encode_text(ids, normalize=True), text)

    export_hf(ours, tmp_path / "hf")
    clip = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    close(F.normalize(clip.get_image_features(pixel_values=x).pooler_output, dim=-1), image)
    close(F.normalize(clip.get_text_features(input_ids=ids).pooler_output, dim=-1), text)
    hf_ids = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "hf"))(
        CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )["input_ids"]
    real = CaptionTokenizer(77).real_positions(ids)
    assert torch.equal(hf_ids[real], ids[real])  # transformers pads with end-of-text, Harmony with 0 after it
    with pytest.raises(ExportError, match="timm has no ViT of this architecture"):
        export_timm(ours, tmp_path / "vit.safetensors")


@torch.no_grad()
def test_a_plain_vit_goes_to_transformers_as_a_vitmodel(tmp_path: Path) -> None:
    ours = student("dino-tiny-test")
    export_hf(ours, tmp_path / "hf")
    vit = transformers.ViTModel.from_pretrained(str(tmp_path / "hf"), add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    close(vit(pixel_values=x).last_hidden_state, ours.visual(x))
    with pytest.raises(ExportError, match="normalises before the ViT blocks"):
        export_hf(student("clip-tiny-test"), tmp_path / "pair")
