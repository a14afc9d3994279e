"""Settings that would make a run's numbers meaningless are refused in one line before anything trains: a
negative or zero objective weight, a batch too small for an objective's loss (globally or per process), and
a run length of zero steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from harmony.config import ConfigError, check_batch_per_process
from harmony.presets import build_config, method_names
from tests.conftest import Cli

# objectives whose loss needs two samples in the batch (a contrast, or BatchNorm over the batch)
NEEDS_TWO = {"clip", "simclr", "siglip", "flip", "simsiam", "mocov3", "byol", "barlowtwins", "vicreg", "swav", "filip"}


@pytest.mark.parametrize("weight", ["-1", "0"])
def test_a_weight_that_cannot_train_is_refused(weight: str) -> None:
    with pytest.raises(ConfigError, match=r"objectives\.clip\.weight' must be positive.*objectives\.clip=null"):
        build_config("clip-tiny-test", [f"objectives.clip.weight={weight}"])


def test_every_method_declares_the_batch_its_loss_needs() -> None:
    for method in method_names():
        preset = f"{method}-tiny-test"
        needs_two = bool(NEEDS_TWO & set(build_config(preset).objectives.enabled()))
        if needs_two:
            with pytest.raises(ConfigError, match=r"'train\.batch_size' must be at least 2 with objectives\.\w+"):
                check_batch_per_process(build_config(preset, ["train.batch_size=1"]), 1)
        else:
            check_batch_per_process(build_config(preset, ["train.batch_size=1"]), 1)


def test_per_process_batchnorm_needs_two_rows_on_every_process() -> None:
    cfg = build_config("byol-tiny-test", ["train.batch_size=2"])
    check_batch_per_process(cfg, 1)
    with pytest.raises(ConfigError, match="gives each of the 2 processes 1 image"):
        check_batch_per_process(cfg, 2)
    check_batch_per_process(build_config("simsiam-tiny-test", ["train.batch_size=2"]), 2)  # BatchNorm over ranks


def test_the_cli_refuses_them_in_one_line(tmp_path: Path, cli: Cli) -> None:
    for args in (["--batch-size", "1"], ["--max-steps", "0"], ["objectives.clip.weight=-1"]):
        proc = cli("train", "--preset", "clip-tiny-test", "--out", str(tmp_path / "run"), *args)
        err = proc.stderr
        assert proc.returncode == 2 and err.startswith("harmony: error: ") and len(err.strip().splitlines()) == 1, err


def test_crops_that_the_patches_do_not_tile_are_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"'data.augment.local_size' \(20\) must be a multiple of the patch size 8 \(e.g. 16\)"
    ):
        build_config("dino-tiny-test", ["data.augment.local_size=20"])
