"""A disk that fills up during a run: one line naming the folder and the space needed, no temp file left
behind, a non-zero exit, the last good checkpoint intact and the run continuing from it once there is room."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from harmony.core import checkpoint as ckpt
from tests.conftest import Cli, TwoRanks

TRAIN = ["train", "--preset", "clip-tiny-test", "--no-progress", "--workers", "0", "train.log_every=1"]


def run(cli: Cli, *args: str) -> tuple[int, str]:
    proc = cli(*TRAIN, *args)
    return proc.returncode, proc.stderr


def test_a_checkpoint_that_does_not_fit_is_one_line_and_leaves_the_last_one(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "run"
    assert run(cli, "--out", str(out), "--max-steps", "2")[0] == 0
    last = out / "checkpoints" / "last.pt"
    before = torch.load(last, weights_only=True)["step"]
    # /dev/full answers every write with ENOSPC: the temp file of the next save lands there
    (out / "checkpoints" / "last.pt.tmp").symlink_to("/dev/full")
    code, err = run(cli, "--out", str(out), "--resume", "auto", "--max-steps", "3")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and str(out / "checkpoints") in err and "MB free" in err
    assert not (out / "checkpoints" / "last.pt.tmp").is_symlink()
    assert torch.load(last, weights_only=True)["step"] == before == 2
    assert run(cli, "--out", str(out), "--resume", "auto", "--max-steps", "3")[0] == 0
    assert torch.load(last, weights_only=True)["step"] == 3


def test_a_log_write_that_fails_is_one_line(tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.tensorboard import SummaryWriter

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    code, err = run(cli, "--out", str(tmp_path / "run"), "--max-steps", "1")
    assert code == 1 and err.strip().splitlines() == [
        f"harmony: error: cannot write to '{tmp_path / 'run'}': No space left on device; free some space, then "
        "continue with --resume auto"
    ]


def test_the_size_estimate_counts_every_tensor() -> None:
    state = {"a": torch.zeros(256, dtype=torch.float32), "b": [torch.zeros(8, dtype=torch.float16)], "c": 3}
    assert ckpt.state_bytes(state) == 256 * 4 + 8 * 2


@pytest.mark.slow
def test_with_two_ranks_a_checkpoint_rank_0_cannot_write_stops_both_in_one_line(two_ranks: TwoRanks) -> None:
    """Only rank 0 writes checkpoints: when it fails, rank 1 learns it at once (it would otherwise wait in the next
    collective until the process group times out) and both exit with the same one-line error."""
    folder = two_ranks.folder("checkpoint_write_failure")
    codes = [int((folder / f"code{rank}").read_text()) for rank in (0, 1)]
    assert codes[0] == codes[1] == ckpt.CheckpointWriteError.exit_code != 0
    errors = [
        [line for line in (folder / f"rank{rank}.log").read_text().splitlines() if "error" in line] for rank in (0, 1)
    ]
    assert len(errors[0]) == 1 and "no space left on the device" in errors[0][0]
    assert len(errors[1]) == 1 and "could not be written (rank 0 says why)" in errors[1][0]
