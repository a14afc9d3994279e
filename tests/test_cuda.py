"""The CUDA path, checked on a GPU: `pytest -m cuda` (part of `harmony check gpu`).

Skipped where no GPU is. `HARMONY_CHECK_DEVICE=cpu` runs the same tests on a CPU with the tiny-test
model: that is what the CPU rehearsal of `harmony check gpu --device cpu` does, so these bodies run
in the ordinary test suite too. `HARMONY_CHECK_SIZE` picks the model size (default: `tiny` on a GPU),
`HARMONY_CHECK_METHODS` (comma-separated) the methods of the bf16 test (default: every method).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harmony.check import probes
from harmony.presets import method_names

DEVICE = os.environ.get("HARMONY_CHECK_DEVICE", "cuda")
SIZE = os.environ.get("HARMONY_CHECK_SIZE", "tiny" if DEVICE == "cuda" else "tiny-test")
METHODS = [m for m in os.environ.get("HARMONY_CHECK_METHODS", "").split(",") if m] or method_names()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize("method", METHODS)
def test_bf16_step_matches_fp32(method: str) -> None:
    probes.precision_matches_fp32(f"{method}-{SIZE}", DEVICE, "bf16")


def test_fp16_with_the_loss_scaler_matches_fp32() -> None:
    probes.precision_matches_fp32(f"harmony-{SIZE}", DEVICE, "fp16")


@pytest.mark.parametrize("method", ["harmony", "siglip", "mocov3"])
def test_gradient_accumulation_matches_the_whole_batch(method: str) -> None:
    probes.accumulation_matches_whole_batch(f"{method}-{SIZE}", DEVICE, "bf16" if DEVICE == "cuda" else "fp32")


def test_fused_adamw_matches_plain_adamw() -> None:
    probes.fused_adamw_matches_reference(f"harmony-{SIZE}", DEVICE)


def test_both_towers_use_fused_attention() -> None:
    found = probes.attention_kernels(f"harmony-{SIZE}", DEVICE, "bf16" if DEVICE == "cuda" else "fp32")
    assert set(found) == {"vision", "text"}


def test_compiled_student_trains_like_eager() -> None:
    probes.compile_matches_eager(f"harmony-{SIZE}", DEVICE)


def test_non_finite_step_is_skipped_on_the_device() -> None:
    probes.nonfinite_step_is_skipped(f"harmony-{SIZE}", DEVICE)


def test_resume_is_exact_and_the_checkpoint_exports(tmp_path: Path) -> None:
    probes.resume_and_export(f"harmony-{SIZE}", DEVICE, tmp_path)
