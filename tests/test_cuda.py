"""The pytest view of the CUDA-path checks listed in the package (`harmony.check.device_checks`), which
`harmony check gpu` runs as its `cuda-tests` part.

On a GPU they run at the `tiny` size; without one they run on the CPU at the tiny-test size, so every
check (and every line of `harmony.check.probes`) runs in the ordinary test suite. `pytest -m cuda`
selects them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from harmony.check.device_checks import DeviceCheck, device_checks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = "tiny" if DEVICE == "cuda" else "tiny-test"
# Known misses of a check on this device, with the figure that misses
KNOWN: dict[tuple[str, str], str] = {}

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def one_thread_on_the_cpu() -> Iterator[None]:
    """The tiny-test models run faster on one CPU thread than on two (no OpenMP hand-offs), and far
    faster while other processes share the cores."""
    threads = torch.get_num_threads()
    if DEVICE == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _param(check: DeviceCheck) -> object:
    reason = KNOWN.get((DEVICE, check.name))
    marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
    return pytest.param(check, id=check.name, marks=marks)


@pytest.mark.parametrize("check", [_param(c) for c in device_checks(DEVICE)])
def test_device_check(check: DeviceCheck, tmp_path: Path) -> None:
    check.run(SIZE, DEVICE, tmp_path)
