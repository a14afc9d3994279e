"""Real multi-process runs (torchrun, gloo on CPU) and interruption: the same numbers as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harmony.core import checkpoint as ckpt
from tests.conftest import REPO, Cli, TwoRanks
from tests.two_ranks import HARMONY, HARMONY_RUN

pytestmark = pytest.mark.slow

COMMON = list(HARMONY)  # the settings of the two-rank harmony runs (tests/two_ranks.py)
LOSSES = ("loss", "loss_clip", "loss_ibot", "loss_mae", "loss_mlm", "loss_text_distill")


def records(run: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def printed(folder: Path) -> str:
    """What both ranks of a two-rank scenario printed."""
    return "".join((folder / f"rank{rank}.log").read_text() for rank in (0, 1))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_times_b_equal_one_rank_times_2b(
    two_ranks: TwoRanks, one_rank: Callable[..., Path], strategy: str
) -> None:
    """Checks gather-with-gradient (CLIP, soft targets), centre all-reduce, global token counts
    (MLM, text distillation) and data sharding together: any of them wrong changes steps 2..5."""
    folder = two_ranks.folder(strategy)
    assert printed(folder).count("trained 5 steps") == 1  # only rank 0 reports
    reference, run = one_rank(*HARMONY_RUN), folder / "run"
    one, two = records(reference), records(run)
    for step in range(1, 6):
        for key in LOSSES:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)
    state = ckpt.load(run / "checkpoints" / "last.pt")["model"]
    single = ckpt.load(reference / "checkpoints" / "last.pt")["model"]
    for key in ("teacher.visual.vit.blocks.0.attn.qkv.weight", "objectives.ibot.cls_center.value"):
        assert state[key].allclose(single[key], rtol=1e-3, atol=1e-5), key


def start(out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "harmony.cli", "train", *COMMON, "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists():
            lines = [line for line in metrics.read_text().splitlines() if line.endswith("}")]
            if any(json.loads(line)["step"] >= step for line in lines):
                return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "run ended early"
        time.sleep(0.05)
    raise AssertionError(f"run did not reach step {step}")


def test_sigkill_mid_epoch_then_resume_gives_the_same_losses(tmp_path: Path, cli: Cli) -> None:
    args = ("--max-steps", "24", "train.save_every=3", "train.keep_last=2")
    reference = tmp_path / "reference"
    assert cli("train", *COMMON, "--out", str(reference), *args).returncode == 0
    killed = tmp_path / "killed"
    proc = start(killed, *args)
    wait_for_step(killed, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = ckpt.load(killed / "checkpoints" / "last.pt")["step"]
    assert 9 <= saved < 24 and saved % 3 == 0
    resumed = cli("train", *COMMON, "--out", str(killed), "--resume", "auto", *args)
    assert resumed.returncode == 0, resumed.stderr
    after, ref = records(killed), records(reference)
    assert sorted(after) == list(range(1, 25))  # lines written after the checkpoint were replaced
    for step in range(saved + 1, 25):
        assert after[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-6), step


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path: Path) -> None:
    proc = start(tmp_path, "--max-steps", "400")
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    state = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert 3 <= state["step"] < 400
    assert max(records(tmp_path)) == state["step"]


def test_half_written_checkpoint_is_ignored_by_resume_auto(tmp_path: Path, cli: Cli) -> None:
    assert cli("train", *COMMON, "--out", str(tmp_path), "--max-steps", "4", "train.save_every=2").returncode == 0
    folder = tmp_path / "checkpoints"
    (folder / "step_00000006.pt.tmp").write_bytes(b"partial")  # a crash during a write
    (folder / "step_00000008.pt").write_bytes(b"torn file from a broken disk")
    assert ckpt.latest(folder) == folder / "last.pt"
