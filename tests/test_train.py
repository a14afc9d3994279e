from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from harmony.core import checkpoint as ckpt
from harmony.train.loop import train
from tests.conftest import Cli, tiny


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_short_clip_run_loss_falls(tmp_path: Path) -> None:
    cfg = tiny(
        "clip-tiny-test",
        "train.max_steps=100",
        "train.log_every=1",
        "optim.lr=0.03",
        "optim.weight_decay=0",
        "optim.weight_decay_end=0",
        "data.augment.global_scale=0.9,1",
        "data.augment.color_jitter=0",
    )
    train(cfg, tmp_path, progress=False)
    curve = list(losses(tmp_path).values())
    assert len(curve) == 100
    assert sum(curve[-10:]) / 10 < 0.6 * sum(curve[:10]) / 10


def test_metrics_config_and_checkpoints_are_written(tmp_path: Path) -> None:
    cfg = tiny("harmony-tiny-test", "train.max_steps=4", "train.log_every=2", "train.save_every=2", "train.keep_last=1")
    train(cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for key in [
        "step",
        "epoch",
        "lr",
        "loss",
        "loss_clip",
        "loss_ibot",
        "loss_mae",
        "loss_mlm",
        "loss_text_distill",
        "ibot_cls_target_entropy",
        "ibot_patch_target_entropy",
        "text_distill_target_entropy",
        "images_per_s",
        "data_time_s",
    ]:
        assert key in records[-1], key
    assert 0.0 < records[-1]["ibot_cls_target_entropy"] <= math.log(cfg.model.head.out_dim) + 1e-4
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "tensorboard").is_dir()
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["last.pt", "step_00000004.pt"]
    state = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 4 and state["config"]["name"] == "harmony-tiny-test"


def test_resume_continues_from_the_saved_step_with_the_same_losses(tmp_path: Path) -> None:
    overrides = ["train.max_steps=10", "train.log_every=1", "train.save_every=4", "train.keep_last=5"]
    full = tmp_path / "full"
    train(tiny("harmony-tiny-test", *overrides), full, progress=False)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_00000004.pt", resumed / "checkpoints" / "step_00000004.pt")
    result = train(tiny("harmony-tiny-test", *overrides), resumed, resume="auto", progress=False)
    assert result.steps == 10
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(5, 11))
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    torch.testing.assert_close(
        ckpt.load(full / "checkpoints" / "last.pt")["model"], ckpt.load(resumed / "checkpoints" / "last.pt")["model"]
    )


def _safetensors_export(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))


def _zip_without_pickle(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")


@pytest.mark.parametrize(
    ("name", "make", "says"),
    [
        ("empty.pt", lambda p, good: p.write_bytes(b""), "an empty file (0 bytes)"),
        ("notes.pt", lambda p, good: p.write_text("epoch 3: loss 0.4\n"), "a text file, not a PyTorch checkpoint"),
        (
            "cut.pt",
            lambda p, good: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
            "a truncated or damaged file",
        ),
        ("vit.safetensors", lambda p, good: _safetensors_export(p), "a safetensors export (weights only"),
        ("other.zip", lambda p, good: _zip_without_pickle(p), "a zip archive that is not a PyTorch checkpoint"),
        (
            "tensor.pt",
            lambda p, good: torch.save({"w": torch.zeros(2)}, p),
            "a PyTorch file but not a Harmony checkpoint",
        ),
        ("folder", lambda p, good: p.mkdir(), "is a folder without checkpoints/last.pt"),
    ],
)
def test_unreadable_checkpoints_say_what_the_file_is(
    tmp_path: Path, clip_checkpoint: Path, name: str, make: Any, says: str
) -> None:
    path = tmp_path / name
    make(path, clip_checkpoint)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load(path)
    message = str(info.value)
    assert says in message and "expected a Harmony training checkpoint" in message, message
    assert "\n" not in message and len(message) < 400


def test_corrupt_checkpoint_is_one_line_from_the_cli(tmp_path: Path, cli: Cli) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = cli("eval", "zeroshot", "--checkpoint", str(bad), "--data", "builtin:shapes:val")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"harmony: error: '{bad}' cannot be loaded: a text file, not a PyTorch checkpoint (it starts with "
        "'not a checkpoint'); expected a Harmony training checkpoint (a run folder, or its checkpoints/last.pt "
        "or step_*.pt)"
    )


def test_loading_a_run_folder_identifies_the_checkpoint_file(clip_checkpoint: Path) -> None:
    from harmony.loading import load

    pretrained = load(clip_checkpoint.parent.parent)
    assert pretrained.path == clip_checkpoint  # the eval caches key on this file's size and mtime


def test_checkpoint_from_another_config_is_refused(tmp_path: Path, clip_checkpoint: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        train(tiny("harmony-tiny-test", "train.max_steps=2"), tmp_path, resume=str(clip_checkpoint), progress=False)


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harmony.train.loop import Trainer
    from harmony.train.step import TrainingError
    from harmony.train.task import PretrainTask, StepLosses

    cfg = tiny(
        "clip-tiny-test", "train.max_steps=12", "train.log_every=1", "train.save_every=2", "train.max_bad_steps=3"
    )
    trainer = Trainer(cfg, tmp_path, progress=False)
    step_losses = PretrainTask.step_losses
    calls = {"n": 0}

    def poisoned(self: PretrainTask, batch: dict[str, torch.Tensor], step: object) -> StepLosses:
        calls["n"] += 1
        loss, metrics = step_losses(self, batch, step)  # type: ignore[arg-type]
        return StepLosses(loss * float("nan") if calls["n"] > 4 else loss, metrics)

    monkeypatch.setattr(PretrainTask, "step_losses", poisoned)
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        trainer.fit()
    good = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert good["step"] == 6 and good["bad_steps"] == 2
    weights_at_4 = ckpt.load(tmp_path / "checkpoints" / "step_00000004.pt")["model"]
    for key, value in good["model"].items():
        if key.startswith("student."):
            torch.testing.assert_close(value, weights_at_4[key])  # skipped steps left the student untouched
