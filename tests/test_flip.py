"""FLIP through the registry: CLIP's loss on the patch-dropped image, the kept count, refusals (its run,
benchmark and evaluation: tests/test_method_smoke.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from harmony.config import ConfigError
from harmony.models.normalize import normalize
from harmony.objective_config import FLIPConfig
from harmony.objectives.base import Encoded, StepInfo
from harmony.objectives.flip import FLIPObjective
from harmony.objectives.registry import needs_for_config
from harmony.presets import build_config
from tests.conftest import Cli
from tests.test_gradients import make_task_and_batch


def direct_info_nce(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE as explicit loops: each row's -log(exp(its pair) / sum exp(row))."""
    n = image.shape[0]
    per_image, per_text = [], []
    for i in range(n):
        row = torch.stack([scale * torch.dot(image[i], text[j]) for j in range(n)])
        column = torch.stack([scale * torch.dot(text[i], image[j]) for j in range(n)])
        per_image.append(torch.log(row.exp().sum()) - row[i])
        per_text.append(torch.log(column.exp().sum()) - column[i])
    return 0.5 * (torch.stack(per_image).mean() + torch.stack(per_text).mean())


def test_flip_loss_is_clip_s_hard_loss_of_the_given_embeddings() -> None:
    gen = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(5, 6, generator=gen), dim=1) for _ in range(2))
    objective = FLIPObjective(FLIPConfig())
    enc = Encoded(image_embed=image, text_embed=text, logit_scale=torch.tensor(3.0))
    out = objective(enc, {}, StepInfo(0, 8))
    torch.testing.assert_close(out.loss, direct_info_nce(image, text, 3.0))
    torch.testing.assert_close(out.metrics["logit_scale"], torch.tensor(3.0))


@pytest.mark.parametrize(("override", "mask_ratio"), [((), 0.5), (("objectives.flip.mask_ratio=0.25",), 0.25)])
def test_flip_reads_the_image_embedding_of_the_kept_patches(override: tuple[str, ...], mask_ratio: float) -> None:
    task, batch = make_task_and_batch("flip-tiny-test", overrides=override)
    gh, gw = task.student.visual.grid(32, 32)
    keep = batch["mae_keep"][0]
    assert keep.shape == (4, int((1 - mask_ratio) * gh * gw))  # 8 of 16 patches, or 12 with mask_ratio 0.25
    assert task.needs.clean_crops == set() and task.teacher is None  # no full-image pass in training
    loss = task.objectives["flip"](task.encode(batch), batch, StepInfo(0, 8)).loss
    images = normalize(batch["global"])
    with torch.no_grad():
        tokens = task.student.visual(images[0], keep_index=keep)
        assert tokens.shape[1] == 1 + keep.shape[1]
        image = task.student.image_embedding(tokens)
        text = task.student.encode_text(batch["text"])
        full_image = task.student.encode_image(images[0])
    scale = task.student.scale().item()
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)
    torch.testing.assert_close(loss, direct_info_nce(image, text, scale))
    assert not torch.allclose(loss, direct_info_nce(full_image, text, scale))  # the full image would differ


def test_flip_with_clip_or_siglip_is_refused_at_config_time() -> None:
    for other in ("clip", "siglip"):
        with pytest.raises(ConfigError, match=f"'objectives.flip' and 'objectives.{other}' cannot be combined"):
            build_config("flip-tiny-test", [f"objectives.{other}={{}}"])


def test_patch_dropping_objectives_share_one_keep_ratio() -> None:
    clash = "'objectives.mae.mask_ratio' and 'objectives.flip.mask_ratio' must match"
    mismatch = "'objectives.mae.mask_ratio' and 'objectives.masked_distill.keep_ratio' must match"
    with pytest.raises(ConfigError, match=re.escape(clash)):
        build_config("flip-tiny-test", ["objectives.mae={}"])  # MAE keeps 25 %, FLIP 50 %
    with pytest.raises(ConfigError, match=re.escape(mismatch)):
        build_config("mae-tiny-test", ["objectives.masked_distill={keep_ratio: 0.5}"])
    matched = build_config("flip-tiny-test", ["objectives.mae={mask_ratio: 0.5}"])
    assert needs_for_config(matched).keep_ratio == 0.5
    assert needs_for_config(build_config("mae-tiny-test", ["objectives.masked_distill={}"])).keep_ratio == 0.25


@pytest.mark.parametrize("ratio", ["0", "1", "1.5"])
def test_flip_mask_ratio_must_lie_strictly_between_0_and_1(ratio: str) -> None:
    with pytest.raises(ConfigError, match=r"'objectives.flip.mask_ratio' must be between 0 and 1 \(exclusive\)"):
        build_config("flip-tiny-test", [f"objectives.flip.mask_ratio={ratio}"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objectives.clip={}", "'objectives.flip' and 'objectives.clip' cannot be combined"),
        ("objectives.mae={}", "'objectives.mae.mask_ratio' and 'objectives.flip.mask_ratio' must match"),
    ],
)
def test_cli_refuses_ambiguous_flip_combinations_with_one_line(
    tmp_path: Path, override: str, message: str, cli: Cli
) -> None:
    proc = cli(
        "train", "--preset", "flip-tiny-test", "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress",
        override,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
