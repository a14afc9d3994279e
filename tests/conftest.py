"""Shared fixtures: tiny configs and a trained tiny checkpoint (built once per session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harmony.config import Config
from harmony.presets import build_config

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


def tiny(preset: str = "harmony-tiny-test", *overrides: str) -> Config:
    return build_config(preset, list(overrides))


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `python -m harmony.cli ...` as a real subprocess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "harmony.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP tiny-test run trained for a few steps (real CLI path)."""
    out = tmp_path_factory.mktemp("clip_run")
    proc = run_cli("train", "--preset", "clip-tiny-test", "--out", str(out), "--max-steps", "6", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="session")
def harmony_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("harmony_run")
    proc = run_cli("train", "--preset", "harmony-tiny-test", "--out", str(out), "--max-steps", "6", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out / "checkpoints" / "last.pt"
