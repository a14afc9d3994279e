"""`harmony export`: the files load into timm and open_clip (offline) and give our model's features."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import open_clip
import pytest
import timm
import torch

from harmony.cli import main
from harmony.export.common import ExportError, check_against
from harmony.export.to_open_clip import export_open_clip
from harmony.export.to_timm import export_timm, timm_state_dict
from harmony.loading import load
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer
from tests.conftest import Cli


def random_pair(vision_size: str, text_size: str | None) -> ImageTextModel:
    """An ImageTextModel at 224 px with random weights, built on the meta device (timm's init is slow)."""
    tokenizer = CaptionTokenizer(context_length=16)
    with torch.device("meta"):
        model = ImageTextModel(
            vision_size,
            text_size,
            embed_dim=32,
            img_size=224,
            vocab_size=tokenizer.vocab_size,
            context_length=16,
            eot_id=tokenizer.eot_id,
            use_mask_token=False,
        )
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            is_norm_scale = tensor.ndim == 1 and name.endswith("weight")  # LayerNorm scales around 1
            tensor.normal_(1.0 if is_norm_scale else 0.0, 0.02, generator=generator)
    return model.requires_grad_(False).eval()


def test_timm_export_of_a_checkpoint_gives_our_features(
    tmp_path: Path, clip_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vit.safetensors"
    assert main(["export", "--checkpoint", str(clip_checkpoint), "--format", "timm", "--out", str(out)]) == 0
    assert "timm.create_model(" in capsys.readouterr().out
    recipe = json.loads(out.with_suffix(".json").read_text())
    # a size without a timm name: every architecture kwarg is in the recipe
    assert recipe["create_model"]["patch_size"] == 8 and recipe["create_model"]["img_size"] == 32
    assert recipe["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    call = dict(recipe["create_model"])
    vit = timm.create_model(call.pop("model_name"), **call).eval()
    assert vit.pretrained_cfg["std"] == [0.229, 0.224, 0.225] and vit.pretrained_cfg["input_size"] == [3, 32, 32]

    ours = load(clip_checkpoint).model.visual
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours(images)
        torch.testing.assert_close(vit.forward_features(images), expected)
        torch.testing.assert_close(vit.forward_head(vit.forward_features(images), pre_logits=True), expected[:, 0])
        assert vit(images).shape == (2, 1000) and not vit(images).any()  # the zero placeholder head

        features_only = timm.create_model(recipe["architecture"], num_classes=0, **call).eval()
        torch.testing.assert_close(features_only(images), expected[:, 0])

        # the sidecar doubles as a timm config.json: the renamed pair is a `local-dir:` model
        folder = tmp_path / "timm_dir"
        folder.mkdir()
        shutil.copy(out, folder / "model.safetensors")
        shutil.copy(out.with_suffix(".json"), folder / "config.json")
        local = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        torch.testing.assert_close(local.forward_features(images), expected)


def test_timm_export_loads_into_vit_small_with_no_missing_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vit_s16 = random_pair("vit-s16", None)
    out = tmp_path / "vit_s16.safetensors"
    export_timm(vit_s16, out)
    recipe = json.loads(out.with_suffix(".json").read_text())
    assert recipe["architecture"] == "vit_small_patch16_224" and recipe["model_args"] == {}
    assert recipe["python"].startswith("timm.create_model('vit_small_patch16_224', pretrained=True, ")

    caplog.set_level(logging.INFO, logger="timm")
    vit = timm.create_model("vit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    assert "Loading pretrained weights from file" in caplog.text
    assert "Missing keys" not in caplog.text and "Unexpected keys" not in caplog.text
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(images), vit_s16.visual(images))


def test_open_clip_export_of_a_checkpoint_matches_our_embeddings(tmp_path: Path, clip_checkpoint: Path) -> None:
    """A size timm has no name for goes in as open_clip's own ViT, so the folder holds all it needs: it is
    moved before loading."""
    written = tmp_path / "written"
    assert main(["export", "--checkpoint", str(clip_checkpoint), "--format", "open_clip", "--out", str(written)]) == 0
    out = tmp_path / "elsewhere" / "open_clip"
    shutil.move(written, out)
    assert not (out / "timm").exists()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    pretrained = load(clip_checkpoint)
    assert pretrained.tokenizer is not None
    captions = ["a red square", "two blue circles on a green background " * 6]  # the second is truncated
    ids = tokenizer(captions)
    assert torch.equal(ids, pretrained.tokenizer(captions))
    # a [MASK] id (the largest) must not move the pooling position: open_clip pools at end-of-text
    masked = ids.clone()
    masked[0, 1] = pretrained.tokenizer.mask_id
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=True), pretrained.model.encode_image(images))
        for tokens in (ids, masked):
            torch.testing.assert_close(
                model.encode_text(tokens, normalize=True), pretrained.model.encode_text(tokens), atol=1e-5, rtol=1e-5
            )
    assert "Normalize(mean=[0.485, 0.456, 0.406]" in repr(preprocess)
    torch.testing.assert_close(model.logit_scale.exp(), pretrained.model.scale())


def test_open_clip_export_uses_timm_names_when_they_fit(tmp_path: Path) -> None:
    pair = random_pair("vit-t16", "tiny-test")
    export_open_clip(pair, tmp_path)
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "vit_tiny_patch16_224"
    assert not (tmp_path / "timm").exists()
    model = open_clip.create_model(f"local-dir:{tmp_path}")  # loads strictly
    # same key mapping as the tiny export above, whose forward passes are compared; here the weights suffice
    theirs = model.visual.trunk.state_dict()
    for name, tensor in pair.visual.vit.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    assert torch.equal(model.visual.head.proj.weight, pair.visual_projection.weight)


def test_export_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vision_only = ImageTextModel("tiny-test", None, 32, 32, vocab_size=0, context_length=8, eot_id=-1)
    with pytest.raises(ExportError, match="needs a text tower"):
        export_open_clip(vision_only, tmp_path / "oc")
    reference = timm.create_model("vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)
    state = timm_state_dict(vision_only.visual)
    check_against(state, reference, "timm")
    with pytest.raises(ExportError, match=r"missing head\.weight"):
        check_against({k: v for k, v in state.items() if not k.startswith("head.")}, reference, "timm")
    # a wrong --out is a usage error, reported before the checkpoint is even read
    bad_out = ["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "timm", "--out", str(tmp_path / "x.pt")]
    assert main(bad_out) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err


def test_exported_files_get_normal_modes(tmp_path: Path, clip_checkpoint: Path) -> None:
    previous = os.umask(0o022)
    try:
        timm_out = tmp_path / "vit.safetensors"
        assert main(["export", "--checkpoint", str(clip_checkpoint), "--format", "timm", "--out", str(timm_out)]) == 0
        oc_out = tmp_path / "oc"
        assert (
            main(["export", "--checkpoint", str(clip_checkpoint), "--format", "open_clip", "--out", str(oc_out)]) == 0
        )
    finally:
        os.umask(previous)
    written = [timm_out, timm_out.with_suffix(".json"), *(p for p in oc_out.rglob("*") if p.is_file())]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {"0o644"}, written  # safetensors wrote 0600


@pytest.mark.parametrize("fmt, name", [("timm", "v.safetensors"), ("open_clip", "oc")])
def test_export_to_an_unwritable_out_is_one_line_before_loading(
    tmp_path: Path, fmt: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = ["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", fmt, "--out", str(blocker / name)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and "none.pt" not in err  # checked before the load


def _train(cli: Cli, tmp_path: Path, preset: str) -> Path:
    out = tmp_path / preset
    proc = cli("train", "--preset", preset, "--out", str(out), "--max-steps", "1", "--no-progress", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    return out


def test_siglip_bias_and_refusals_a_user_meets(tmp_path: Path, cli: Cli) -> None:
    """SigLIP's learnt bias reaches open_clip's `logit_bias`; an earlier export is never overwritten without
    --overwrite; an image-only run says what to export instead of pointing at another --weights."""
    siglip = _train(cli, tmp_path, "siglip-tiny-test")
    out = tmp_path / "oc"
    assert cli("export", "--checkpoint", str(siglip), "--format", "open_clip", "--out", str(out)).returncode == 0
    bias = torch.load(siglip / "checkpoints" / "last.pt", weights_only=True)["model"]["objectives.siglip.logit_bias"]
    model = open_clip.create_model(f"local-dir:{out}")
    assert torch.equal(model.logit_bias.reshape(1), bias.reshape(1))
    (tmp_path / "v.json").write_text("{}")  # only the sidecar of an earlier timm export is left: still refused
    for fmt, target in (("open_clip", out), ("timm", tmp_path / "v.safetensors")):
        proc = cli("export", "--checkpoint", str(siglip), "--format", fmt, "--out", str(target))
        err = proc.stderr
        assert proc.returncode == 1 and "already exist" in err and "--overwrite" in err and err.count("\n") == 1
    again = cli("export", "--checkpoint", str(siglip), "--format", "open_clip", "--out", str(out), "--overwrite")
    assert again.returncode == 0
    byol = _train(cli, tmp_path, "byol-tiny-test")
    for weights in ("auto", "student"):
        args = ["export", "--checkpoint", str(byol), "--format", "open_clip", "--out", str(tmp_path / weights)]
        proc = cli(*args, "--weights", weights)
        assert proc.returncode == 1 and "trains none: export the image tower with --format timm" in proc.stderr
        assert "--weights" not in proc.stderr
