from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harmony.config import ConfigError, set_override, to_dict
from harmony.presets import build_config, preset_names
from tests.conftest import Cli


def test_presets_cover_methods_and_sizes() -> None:
    names = preset_names()
    for name in [
        "clip-tiny",
        "clip-vit-s16",
        "clip-vit-b16",
        "harmony-tiny",
        "harmony-vit-s16",
        "slip-tiny",
        "maskclip-tiny",
        "dino-tiny",
        "ibot-tiny",
        "mae-tiny",
        "clip+ibot+soft+mae-vit-s16",
        "clip+mlm+tdist-tiny",
    ]:
        assert name in names


def test_method_presets_enable_their_objectives() -> None:
    assert build_config("clip-tiny").objectives.enabled() == ["clip"]
    harmony = build_config("harmony-vit-s16")
    assert harmony.objectives.enabled() == ["clip", "ibot", "mae", "mlm", "text_distill"]
    assert harmony.objectives.clip is not None and harmony.objectives.clip.soft_targets
    assert harmony.objectives.mae is not None and harmony.objectives.mae.decoder.depth == 8
    assert harmony.model.head.out_dim == 8192 and harmony.train.batch_size == 768
    dino = build_config("dino-tiny")
    assert dino.objectives.ibot is not None and not dino.objectives.ibot.patch_loss
    # size-dependent objective defaults apply only to enabled objectives
    assert build_config("clip-tiny").objectives.mae is None


def test_same_size_shares_model_and_budget() -> None:
    clip, harmony = build_config("clip-tiny"), build_config("harmony-tiny")
    assert to_dict(clip.model) == to_dict(harmony.model)
    assert to_dict(clip.train) == to_dict(harmony.train)
    assert to_dict(clip.optim) == to_dict(harmony.optim)


def test_overrides_are_typed() -> None:
    cfg = build_config("clip-tiny", ["optim.lr=1e-3", "train.batch_size=64", "data.augment.global_scale=0.5,1.0"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 64
    assert cfg.data.augment.global_scale == (0.5, 1.0)


def test_override_switches_objectives_on_and_off() -> None:
    cfg = build_config("harmony-tiny", ["objectives.mae=null"])
    assert "mae" not in cfg.objectives.enabled()
    cfg = set_override(build_config("clip-tiny"), "objectives.mae.weight=0.5")
    assert cfg.objectives.mae is not None and cfg.objectives.mae.weight == 0.5


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optim.lr=abc", "optim.lr"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("train.precision=fp8", "train.precision"),
        ("model.vision=vit-huge", "model.vision"),
        ("objectives.ibot.mask_probability=2", "objectives.ibot.mask_probability"),
        ("train.batch_size=0", "train.batch_size"),
        ("novalue", "novalue"),
    ],
)
def test_bad_overrides_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config("harmony-tiny", [override])


def test_unknown_preset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("unknown preset 'clap-tiny': did you mean 'clip-tiny'?")):
        build_config("clap-tiny")


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("optim.lrr=1", "did you mean 'optim.lr'?"),
        ("trian.epochs=1", "did you mean 'train'?"),
        ("objectives.clip.wieght=1", "did you mean 'objectives.clip.weight'?"),
    ],
)
def test_unknown_keys_suggest_the_closest_one(override: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(hint)):
        build_config("clip-tiny-test", [override])


def test_typos_in_a_yaml_config_file_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("objectives: {clip: {}}\noptim: {lr: 1e-3, warmup_epoch: 1}\n")
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'optim.warmup_epoch'; did you mean")):
        build_config(str(path))


@pytest.mark.slow
def test_cli_config_errors_exit_2_with_one_line(cli: Cli) -> None:
    proc = cli("train", "--preset", "clip-tiny", "--print-config", "optim.lrr=1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lrr" in lines[0] and "Traceback" not in proc.stderr
    proc = cli("train", "--preset", "nope-tiny", "--print-config")
    assert proc.returncode == 2 and "unknown preset" in proc.stderr


@pytest.mark.slow
def test_cli_print_config_applies_flags(cli: Cli) -> None:
    proc = cli(
        "train", "--preset", "clip-tiny", "--batch-size", "32", "--epochs", "2", "--print-config", "optim.lr=3e-4"
    )
    assert proc.returncode == 0, proc.stderr
    assert "batch_size: 32" in proc.stdout and "epochs: 2.0" in proc.stdout and "lr: 0.0003" in proc.stdout


def test_vision_init_is_checked_and_changes_the_weights() -> None:
    import torch

    from harmony.models.vision import VisionTower

    with pytest.raises(ConfigError, match=r"model\.vision_init"):
        build_config("clip-tiny-test", ["model.vision_init=xavier"])
    torch.manual_seed(0)
    jax = VisionTower("tiny", img_size=64, init="jax").vit.blocks[0].mlp.fc1
    torch.manual_seed(0)
    timm = VisionTower("tiny", img_size=64, init="timm").vit.blocks[0].mlp.fc1
    fan_in, fan_out = jax.weight.shape[1], jax.weight.shape[0]
    assert abs(jax.weight.std().item() - (2 / (fan_in + fan_out)) ** 0.5) < 0.01  # xavier-uniform
    assert abs(timm.weight.std().item() - 0.02) < 0.003  # trunc-normal 0.02


def test_cli_output_into_a_closed_pipe_exits_quietly() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "harmony.cli", "presets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written (`harmony presets | head -0`)
    stderr = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
