"""`--init` from every kind of source: a model built locally with random weights by its own library is saved
in that library's layout, a run starts from it, and Harmony's towers give the source implementation's
features on the same inputs (float32, relative difference at most 1e-4). The OpenAI architecture (a LayerNorm
before the blocks, QuickGELU) is checked at ViT-B/16 with open_clip and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from harmony.core.distributed import DistInfo
from harmony.core.errors import CheckpointError
from harmony.export.to_timm import export_timm
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer
from harmony.presets import build_config
from harmony.train.cli import with_init
from harmony.train.step import Stepper
from harmony.weights.apply import InitSummary
from tests.conftest import Cli

CAPTIONS = ["a photo of a dog", "two blue circles on a green background"]


def started(preset: str, source: str, *overrides: str) -> tuple[ImageTextModel, InitSummary]:
    """The student of a run of `preset` started from `source`, and what the start loaded."""
    cfg, init = with_init(build_config(preset, [f"model.init={source}", *overrides]))
    stepper = Stepper(cfg, torch.device("cpu"), DistInfo(), init)
    assert stepper.init_summary is not None
    return stepper.task.student.eval(), stepper.init_summary


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def images(size: int, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_timm_file_and_folder_give_timms_features(tmp_path: Path) -> None:
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    timm.models.save_for_hf(reference, str(tmp_path / "folder"))
    x = images(224)
    for source in (f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.safetensors'}", str(tmp_path / "folder")):
        student, summary = started("dino-tiny-test", source, "data.augment.global_size=224")
        close(student.visual(x), reference.forward_features(x))
        assert "visual.vit.pos_embed" in summary.loaded and not summary.adapted


@torch.no_grad()
def test_open_clip_vit_b16_openai_architecture(tmp_path: Path) -> None:
    reference = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "oc.safetensors"))
    student, summary = started(
        "clip-tiny-test", f"open_clip:ViT-B-16-quickgelu:{tmp_path / 'oc.safetensors'}", "data.augment.global_size=224"
    )
    assert student.visual.spec.pre_norm and student.visual.spec.act == "quick_gelu" and student.visual.spec.depth == 12
    x = images(224)
    ids = CaptionTokenizer(77)(CAPTIONS)
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-16-quickgelu")(CAPTIONS))
    close(student.encode_image(x), reference.encode_image(x, normalize=True))
    close(student.encode_text(ids), reference.encode_text(ids, normalize=True))
    assert any("[MASK] row starts fresh" in line for line in summary.adapted)
    # and back to timm, under the timm name of this architecture (its head: the CLIP image projection)
    export_timm(student, tmp_path / "vit.safetensors")
    assert json.loads((tmp_path / "vit.json").read_text())["architecture"] == "vit_base_patch16_clip_quickgelu_224"
    folder = tmp_path / "timm"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "vit.json").read_text())
    (tmp_path / "vit.safetensors").rename(folder / "model.safetensors")
    vit = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    close(F.normalize(vit(x), dim=-1), student.encode_image(x))


def transformers_clip(folder: Path, **vision: int) -> tuple[object, torch.Tensor, torch.Tensor]:
    """A transformers CLIPModel with random weights saved to `folder`, and its features of IMAGES / CAPTIONS."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = (
        {}
        if vision
        else {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    )
    text = {} if vision else small
    config = transformers.CLIPConfig(
        vision_config={"patch_size": 16, "image_size": 224, **vision, **small}, text_config=text, projection_dim=64
    )
    reference = transformers.CLIPModel(config).eval()
    reference.save_pretrained(str(folder))
    x, ids = images(224), CaptionTokenizer(77)(CAPTIONS)
    with torch.no_grad():
        image = F.normalize(reference.get_image_features(pixel_values=x).pooler_output, dim=-1)
        text_features = F.normalize(reference.get_text_features(input_ids=ids).pooler_output, dim=-1)
    return reference, image, text_features


@torch.no_grad()
def test_transformers_clip_vit_b16_folder(tmp_path: Path) -> None:
    _, image, text = transformers_clip(tmp_path / "b16", hidden_size=768, num_hidden_layers=12)
    student, _ = started("clip-tiny-test", str(tmp_path / "b16"), "data.augment.global_size=224")
    assert student.visual.spec.pre_norm and student.visual.spec.depth == 12 and student.visual.spec.act == "quick_gelu"
    close(student.encode_image(images(224)), image)
    close(student.encode_text(CaptionTokenizer(77)(CAPTIONS)), text)


@torch.no_grad()
def test_transformers_clip_from_the_local_hub_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = tmp_path / "hub" / "models--someone--clip-small" / "snapshots" / "abc123"
    _, image, text = transformers_clip(snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    student, _ = started("clip-tiny-test", "hf-hub:someone/clip-small", "data.augment.global_size=224")
    close(student.encode_image(images(224)), image)
    close(student.encode_text(CaptionTokenizer(77)(CAPTIONS)), text)
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache.*huggingface-cli download other/x"):
        started("clip-tiny-test", "hf-hub:other/x")


def official_layouts(vit: torch.nn.Module) -> dict[str, dict[str, object]]:
    """A timm ViT's weights in the layouts DINO, iBOT, DINOv2 and MAE published."""
    own = {k: v.clone() for k, v in vit.state_dict().items()}
    width = own["cls_token"].shape[-1]
    head = {"head.mlp.0.weight": torch.zeros(8, width)}
    dino = {
        "teacher": {**{f"backbone.{k}": v for k, v in own.items()}, **head},
        "student": {f"module.backbone.{k}": v + 1 for k, v in own.items()},
        "epoch": 100,
    }
    ibot = {"teacher": {f"backbone.{k}": v for k, v in {**own, "masked_embed": torch.ones(1, width)}.items()}}
    dinov2 = {**own, "mask_token": torch.full((1, width), 0.5)}
    mae = {"model": {**own, "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, width)}}
    return {"dino": dino, "ibot": ibot, "dinov2": dinov2, "mae": mae}


@torch.no_grad()
def test_official_dino_ibot_dinov2_mae_layouts(tmp_path: Path) -> None:
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64).eval()
    scaled = timm.models.vision_transformer.VisionTransformer(  # DINOv2's shape: patch 14, LayerScale
        img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=1, init_values=1e-5, num_classes=0
    ).eval()
    for kind, reference in (("dino", plain), ("ibot", plain), ("dinov2", scaled), ("mae", plain)):
        size = reference.patch_embed.img_size[0]
        torch.save(official_layouts(reference)[kind], tmp_path / f"{kind}.pth")
        student, summary = started(
            "ibot-tiny-test", f"{kind}:{tmp_path / f'{kind}.pth'}", f"data.augment.global_size={size}"
        )
        x = images(size)
        close(student.visual(x), reference.forward_features(x))
        assert ("visual.mask_token" in summary.loaded) == (kind in ("ibot", "dinov2")), kind
        assert not any("decoder" in k for k in summary.loaded)
    student, _ = started(
        "ibot-tiny-test", f"dino:{tmp_path / 'dino.pth'}", "model.init_weights=student", "data.augment.global_size=64"
    )
    torch.testing.assert_close(student.visual.vit.cls_token, plain.cls_token + 1)


def test_what_cannot_be_used_is_one_line_before_training(tmp_path: Path, cli: Cli) -> None:
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file(tiny.state_dict(), str(tmp_path / "tiny.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "tiny.safetensors").read_bytes()[:5000])
    registers = {**tiny.state_dict(), "register_tokens": torch.zeros(1, 4, 192), "mask_token": torch.zeros(1, 192)}
    torch.save(registers, tmp_path / "reg.pth")
    cases = {
        f"timm:vit_small_patch16_224:{tmp_path / 'tiny.safetensors'}": "not those of this architecture",
        f"timm:vit_tiny_patch16_224:{tmp_path / 'cut.safetensors'}": "not a readable safetensors file",
        f"dinov2:{tmp_path / 'reg.pth'}": "register tokens",
        f"timm:resnet50:{tmp_path / 'tiny.safetensors'}": "not a ViT",
        str(tmp_path / "nothing"): "no such file or folder",
    }
    for source, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            started("dino-tiny-test", source)
        assert "\n" not in str(info.value)
    for source in cases:  # and from the command line: one line, exit 1, nothing trained
        proc = cli(
            "train", "--preset", "dino-tiny-test", "--init", source, "--out", str(tmp_path / "run"), "--no-progress"
        )
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "harmony: error: --init" in proc.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_records_its_source_architecture_and_resumes_without_init(tmp_path: Path, cli: Cli) -> None:
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    run = tmp_path / "run"
    args = ["--preset", "dino-tiny-test", "--out", str(run), "--no-progress", "--workers", "0"]
    proc = cli(
        "train", *args, "--max-steps", "1", "--init", f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.safetensors'}"
    )
    assert proc.returncode == 0, proc.stderr
    assert "model.vision: tiny-test -> the source's (patch_size 8 -> 16, embed_dim 32 -> 192" in proc.stdout
    assert "interpolated to 2x2" in proc.stdout and "init: 150 tensors loaded from timm:vit_tiny" in proc.stdout
    recorded = (run / "config.yaml").read_text()
    assert "timm_name: vit_tiny_patch16_224" in recorded and "embed_dim: 192" in recorded
    assert f"init: timm:vit_tiny_patch16_224:{tmp_path / 'vit.safetensors'}" in recorded
    summary = json.loads((run / "init.json").read_text())
    assert len(summary["loaded"]) == 150 and summary["adapted"][0].startswith("visual.vit.pos_embed resampled")
    assert "visual.mask_token" in summary["new"] and any(
        k.startswith("objectives.ibot.student_head") for k in summary["new"]
    )
    proc = cli("train", "--out", str(run), "--resume", "auto", "--max-steps", "2", "--no-progress")
    assert proc.returncode == 0 and "init:" not in proc.stdout, proc.stdout + proc.stderr
