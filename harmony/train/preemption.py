"""Graceful stop on SIGTERM/SIGUSR1 (SLURM pre-emption and requeue) and Ctrl-C (SIGINT): finish the
step, save, exit 0. A second Ctrl-C aborts at once (KeyboardInterrupt, nothing saved).

The handler only records the signal; the loop checks `requested()` after each step. With several
processes the decision is all-reduced at log steps so every rank stops after the same step (torchrun
and srun deliver the signal to every rank, but not necessarily between the same two steps); keep
`train.log_every` x step time well inside the grace period (torchrun: 30 s, SLURM: --signal's lead).
"""

from __future__ import annotations

import contextlib
import os
import signal
from types import FrameType

import torch

from harmony.core.distributed import all_reduce_sum, world_size

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: the main process decides
            return
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # os.write, not print: a signal handler may interrupt a print in progress
            os.write(2, b"\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort at once)\n")

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]

    def requested(self, agree: bool) -> bool:
        """Whether to stop now. With several processes the ranks compare flags only when `agree`
        (the loop passes its log steps, where it synchronises anyway), and then all stop together."""
        local = self.signal_name is not None
        if world_size() == 1:
            return local
        if not agree:
            return False
        return bool(all_reduce_sum(torch.tensor([float(local)])).item() > 0)
