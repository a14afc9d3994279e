"""CNN image towers (`model.vision=timm:NAME`): pooled-feature methods train on them, patch-token methods and
protocols are refused in one line, BatchNorm is global under DDP, and the tower exports to timm."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import BatchNormAct2d
from torch import nn

from harmony.core import checkpoint as ckpt
from harmony.loading import load
from harmony.models.cnn import CNNTower, cnn_width
from harmony.models.global_batchnorm import GlobalBatchNorm2d, to_global_batchnorm
from harmony.models.sizes import cnn_size
from harmony.train.bench import measure
from harmony.train.task import PretrainTask
from tests.conftest import Cli, TwoRanks, in_process, tiny
from tests.test_distributed import records
from tests.two_ranks import CNN_RUN

CNN = "model.vision=timm:resnet-tiny"


def one_line(proc: object) -> str:
    """The single stderr line of a refused command (exit 2)."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)  # type: ignore[attr-defined]
    lines = proc.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, lines
    return str(lines[0])


@pytest.fixture(scope="module")
def cnn_clip_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP run on the tiny ResNet, three steps."""
    out = tmp_path_factory.mktemp("cnn_clip")
    proc = in_process(
        "train", "--preset", "clip-tiny-test", CNN, "--out", str(out), "--max-steps", "3", "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_named_cnns_give_their_pooled_width_and_one_token_per_image() -> None:
    widths = {"timm:resnet50": 2048, "timm:convnext_tiny": 768, "timm:efficientnet_b0": 1280, "timm:resnet-tiny": 128}
    for name, width in widths.items():
        spec = cnn_size(name)
        assert spec is not None and cnn_width(spec) == width, name
    tower = CNNTower(cnn_size("timm:resnet-tiny"))  # type: ignore[arg-type]
    for side in (32, 16, 40):  # any crop size (DINO's local crops)
        assert tower(torch.randn(2, 3, side, side)).shape == (2, 1, 128)
    with pytest.raises(ValueError, match="no patch tokens"):
        tower(torch.randn(2, 3, 32, 32), mask=torch.zeros(2, 4, 4, dtype=torch.bool))


def test_dino_trains_on_the_tiny_resnet_and_its_teacher_keeps_batchnorm_buffers(tmp_path: Path, cli: Cli) -> None:
    proc = cli("train", "--preset", "dino-tiny-test", CNN, "--out", str(tmp_path), "--max-steps", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    losses = [row["loss"] for row in records(tmp_path).values()]
    assert losses and all(math.isfinite(x) for x in losses)
    state = ckpt.load(tmp_path / "checkpoints" / "last.pt")["model"]
    # the teacher normalises its own passes by their batch statistics (as DINO's teacher does): its running
    # statistics are its own, copied from the student at the start and moved since
    key = "visual.net.bn1.running_mean"
    assert f"teacher.{key}" in state and f"student.{key}" in state
    assert state[f"teacher.{key}"].abs().sum() > 0


def test_a_teacher_starts_as_a_copy_with_the_students_batchnorm_statistics() -> None:
    task = PretrainTask(tiny("byol-tiny-test", CNN), None)
    assert task.teacher is not None
    student, teacher = task.student.state_dict(), task.teacher.state_dict()
    buffers = [k for k in student if k.startswith("visual.") and "running_" in k]
    assert buffers and all(torch.equal(student[k], teacher[k]) for k in buffers)
    assert all(student[k].data_ptr() != teacher[k].data_ptr() for k in buffers)  # copies, not shared


@pytest.mark.parametrize(
    ("preset", "objective"),
    [
        ("harmony-tiny", "ibot"),
        ("mae-tiny-test", "mae"),
        ("flip-tiny-test", "flip"),
        ("maskclip-tiny-test", "masked_distill"),
        ("filip-tiny-test", "filip"),
    ],
)
def test_methods_that_read_patch_tokens_are_refused_in_one_line(
    tmp_path: Path, cli: Cli, preset: str, objective: str
) -> None:
    line = one_line(cli("train", "--preset", preset, CNN, "--out", str(tmp_path / "run")))
    assert f"objectives.{objective} needs patch tokens" in line and "timm:resnet-tiny" in line
    assert not (tmp_path / "run").exists()  # refused before the run folder is used


def test_cnn_settings_that_cannot_apply_are_one_line(tmp_path: Path, cli: Cli) -> None:
    out = ("--out", str(tmp_path / "run"), "--max-steps", "1")
    assert "timm has no model 'nosuch'" in one_line(
        cli("train", "--preset", "clip-tiny-test", "model.vision=timm:nosuch", *out)
    )
    assert "not a CNN" in one_line(
        cli("train", "--preset", "clip-tiny-test", "model.vision=timm:vit_tiny_patch16_224", *out)
    )
    assert "train.accum_steps" in one_line(cli("train", "--preset", "clip-tiny-test", CNN, "--accum-steps", "2", *out))
    assert "optim.layer_decay" in one_line(
        cli("train", "--preset", "clip-tiny-test", CNN, "optim.layer_decay=0.7", *out)
    )
    assert "--init" in one_line(cli("train", "--preset", "clip-tiny-test", CNN, "--init", str(tmp_path), *out))


def test_a_cnn_run_is_no_init_source(tmp_path: Path, cli: Cli, cnn_clip_run: Path) -> None:
    proc = cli("train", "--preset", "clip-tiny-test", "--init", str(cnn_clip_run), "--out", str(tmp_path / "r"))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "CNN timm:resnet-tiny" in proc.stderr


def test_a_cnn_run_resumes(tmp_path: Path, cli: Cli) -> None:
    common = ("train", "--preset", "simsiam-tiny-test", CNN, "--out", str(tmp_path), "--no-progress")
    assert cli(*common, "--max-steps", "2").returncode == 0
    resumed = cli(*common, "--resume", "auto", "--max-steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(records(tmp_path)) == [2, 3]  # log_every 2, and the resumed step 3 at the end


def test_timm_export_of_the_cnn_gives_its_features(tmp_path: Path, cli: Cli, cnn_clip_run: Path) -> None:
    out = tmp_path / "resnet.safetensors"
    proc = cli("export", "--checkpoint", str(cnn_clip_run), "--format", "timm", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    recipe = json.loads(out.with_suffix(".json").read_text())
    ours = load(cnn_clip_run).model.visual.eval()
    images = torch.randn(3, 3, 32, 32)
    plain = timm.create_model(recipe["architecture"], pretrained=False, num_classes=0, **recipe["model_args"])
    plain.load_state_dict(load_file(str(out)))  # strict: every tensor, nothing else
    call = recipe["create_model"]
    from_sidecar = timm.create_model(**call)  # the sidecar's own call reads the file
    with torch.no_grad():
        expected = ours(images)[:, 0]
        torch.testing.assert_close(plain.eval()(images), expected)
        torch.testing.assert_close(from_sidecar.eval()(images), expected)
    refused = cli("export", "--checkpoint", str(cnn_clip_run), "--format", "open_clip", "--out", str(tmp_path / "oc"))
    assert refused.returncode == 1 and "--format timm" in refused.stderr


def test_pooled_protocols_run_and_patch_protocols_say_why_not(tmp_path: Path, cli: Cli, cnn_clip_run: Path) -> None:
    for task in ("segment", "detect", "attention"):
        line = one_line(cli("eval", task, "--checkpoint", str(cnn_clip_run), "--data", "builtin:shapes:val"))
        assert f"eval {task} reads" in line and "no patch tokens" in line
    proc = cli("eval", "knn", "--checkpoint", str(cnn_clip_run), "--data", "builtin:shapes:val", "--max-eval", "32")
    assert proc.returncode == 0, proc.stderr


def test_bench_counts_the_cnns_flops() -> None:
    result = measure("clip-tiny-test", [CNN], "cpu", batch_size=4, steps=1, warmup=0)
    assert result["flops_by_component"]["student CNN"] > 0


def test_global_batchnorm2d_is_batchnorm2d_on_one_rank_and_keeps_timms_activation() -> None:
    torch.manual_seed(0)
    plain, act = nn.BatchNorm2d(4), BatchNormAct2d(4, act_layer=nn.SiLU)
    with torch.no_grad():
        for norm in (plain, act):
            norm.weight.copy_(torch.linspace(0.5, 2.0, 4))
            norm.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    model = nn.Sequential(plain, act)
    converted = to_global_batchnorm(nn.Sequential(nn.BatchNorm2d(4), BatchNormAct2d(4, act_layer=nn.SiLU)))
    converted.load_state_dict(model.state_dict())
    assert all(isinstance(m, GlobalBatchNorm2d) for m in converted)
    assert converted.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(6, 4, 3, 5) * 2 + 1
    torch.testing.assert_close(converted(x), model(x))
    for ours, theirs in zip(converted, model):
        torch.testing.assert_close(ours.running_var, theirs.running_var)
    torch.testing.assert_close(converted.eval()(x), model.eval()(x))


@pytest.mark.slow
def test_two_ranks_with_global_batchnorm_equal_one_rank(two_ranks: TwoRanks, one_rank: Callable[..., Path]) -> None:
    """DINO on the tiny ResNet: 2 ranks x 4 images give the losses and BatchNorm statistics of 1 x 8."""
    run = two_ranks.folder("cnn_dino") / "run"
    reference = one_rank(*CNN_RUN)
    one, two = records(reference), records(run)
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4, abs=1e-5), step
    state = ckpt.load(run / "checkpoints" / "last.pt")["model"]
    single = ckpt.load(reference / "checkpoints" / "last.pt")["model"]
    for key in ("student.visual.net.bn1.running_var", "teacher.visual.net.layer4.0.bn2.running_mean"):
        torch.testing.assert_close(state[key], single[key], rtol=1e-3, atol=1e-5, msg=key)
