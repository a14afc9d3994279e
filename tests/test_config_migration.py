"""Renamed and removed config keys: old runs, old YAML files and old overrides keep their values under the new
names, and a removed key (one no code read) is dropped without a word.

The self-distillation sections now spell their temperatures alike (`teacher_temp_start/end/warmup_epochs`);
a stored config that still says `teacher_temp_patch_end` must not fall back to the default silently.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

import harmony
from harmony.config import REMOVED_KEYS, RENAMED_KEYS, AugmentConfig, ConfigError, upgrade_keys
from harmony.core import checkpoint as ckpt
from harmony.objectives.base import StepInfo
from harmony.presets import build_config
from harmony.typed import flatten, to_dict
from tests.conftest import Cli


def test_old_keys_in_overrides_and_yaml_files_reach_the_new_ones(tmp_path: Path) -> None:
    cfg = build_config("ibot-tiny-test", ["objectives.ibot.teacher_temp_patch_end=0.05"])
    assert cfg.objectives.ibot is not None and cfg.objectives.ibot.teacher_temp_end == 0.05
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"objectives": {"clip": {}, "masked_distill": {"teacher_temp": 0.03}}}))
    section = build_config(str(old)).objectives.masked_distill
    assert section is not None and (section.teacher_temp_start, section.teacher_temp_end) == (0.03, 0.03)


def test_a_removed_key_is_dropped_from_files_and_refused_as_an_override(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"objectives": {"clip": {}}, "data": {"augment": {"eval_resize_ratio": 1.0}}}))
    assert build_config(str(old)).data.augment == AugmentConfig()
    with pytest.raises(ConfigError, match=r"'data\.augment\.eval_resize_ratio' was removed"):
        build_config("clip-tiny-test", ["data.augment.eval_resize_ratio=1.0"])
    keys = set(flatten(to_dict(build_config("harmony-tiny-test"))))
    assert not REMOVED_KEYS & keys


def test_upgrade_moves_every_renamed_key_and_leaves_the_rest() -> None:
    data = {"objectives": {"ibot": {"teacher_temp_patch_start": 0.02, "teacher_temp_start": 0.04, "weight": 2.0}}}
    up = upgrade_keys(data)
    assert up["objectives"]["ibot"] == {"teacher_temp_start": 0.02, "weight": 2.0}
    assert data["objectives"]["ibot"]["teacher_temp_patch_start"] == 0.02  # the input is not modified
    assert upgrade_keys({"objectives": {"ibot": None}}) == {"objectives": {"ibot": None}}
    keys = set(flatten(to_dict(build_config("harmony-tiny-test")))) | set(
        flatten(to_dict(build_config("maskclip-tiny-test")))
    )
    assert not set(RENAMED_KEYS) & keys  # an old key is no field any more, and each new one is
    assert all(new in keys for names in RENAMED_KEYS.values() for new in names)


def test_the_warm_up_reads_the_new_keys_for_every_self_distillation() -> None:
    from harmony.objectives.registry import build_objectives

    cfg = build_config(
        "harmony-tiny-test",
        ["objectives.ibot.teacher_temp_end=0.09", "objectives.ibot.teacher_temp_warmup_epochs=2"],
    )
    ibot = build_objectives(cfg, vocab_size=64)["ibot"]
    assert ibot.teacher_temperature(StepInfo(0, 10)) == 0.04  # type: ignore[operator]
    assert abs(ibot.teacher_temperature(StepInfo(10, 10)) - 0.065) < 1e-9  # type: ignore[operator]
    assert ibot.teacher_temperature(StepInfo(30, 10)) == 0.09  # type: ignore[operator]
    mask = build_objectives(build_config("maskclip-tiny-test"), vocab_size=64)["masked_distill"]
    assert mask.teacher_temperature(StepInfo(0, 10)) == 0.04  # type: ignore[operator]


def _rename_back(config: dict) -> dict:
    """A config as the version before the rename (and before a key's removal) wrote it."""
    ibot = config["objectives"]["ibot"]
    ibot["teacher_temp_patch_start"] = ibot.pop("teacher_temp_start")
    ibot["teacher_temp_patch_end"] = ibot.pop("teacher_temp_end")
    config["data"]["augment"]["eval_resize_ratio"] = 1.0
    return config


def test_a_run_written_with_the_old_keys_resumes_and_loads_with_its_values(tmp_path: Path, cli: Cli) -> None:
    run = tmp_path / "run"
    common = ("--preset", "ibot-tiny-test", "--data", "builtin:shapes", "--out", str(run), "--workers", "0")
    first = cli("train", *common, "--max-steps", "2", "--no-progress", "objectives.ibot.teacher_temp_end=0.05")
    assert first.returncode == 0, first.stderr
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    state["config"] = _rename_back(state["config"])
    ckpt.save_atomic(state, last)
    (run / "config.yaml").write_text(yaml.safe_dump(_rename_back(yaml.safe_load((run / "config.yaml").read_text()))))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ignoring settings this version does not know" for a removed key
        loaded = harmony.load(last)
    assert loaded.config.objectives.ibot is not None and loaded.config.objectives.ibot.teacher_temp_end == 0.05

    resumed = cli("train", *common, "--resume", "auto", "--max-steps", "3", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    for key in ("teacher_temp", "eval_resize_ratio"):  # no change reported, nothing ignored
        assert key not in resumed.stdout + resumed.stderr
    assert "differs" not in resumed.stderr
    now = yaml.safe_load((run / "config.yaml").read_text())["objectives"]["ibot"]
    assert now["teacher_temp_end"] == 0.05 and "teacher_temp_patch_end" not in now
