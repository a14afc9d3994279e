"""Shared fixtures: tiny configs, the `harmony` command in this process or as a real subprocess, trained tiny
checkpoints and the one two-rank launch (built once per session)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harmony.cli import main
from harmony.config import Config
from harmony.presets import build_config

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

Cli = Callable[..., subprocess.CompletedProcess[str]]

# `harmony train` settings of the runs that change a resumable setting part way (accumulation steps, caption
# padding) and compare with the same uninterrupted four steps (`one_rank("train", *RESUMABLE, "--max-steps", "4")`)
RESUMABLE = ("--preset", "harmony-tiny-test", "--data", "builtin:shapes", "--workers", "0", "--no-progress")
RESUMABLE += ("model.context_length=77", "train.log_every=1")


def tiny(preset: str = "harmony-tiny-test", *overrides: str) -> Config:
    return build_config(preset, list(overrides))


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `python -m harmony.cli ...` as a real subprocess: for what needs one (signals, locks between
    processes, what a fresh interpreter imports) and to cover the entry point itself."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "harmony.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=full_env,
        timeout=timeout,
    )


def _exit_code(exc: SystemExit) -> int:
    """The status an interpreter ends with on `exc`; a message (`SystemExit("...")`) goes to stderr, status 1."""
    if exc.code is None or isinstance(exc.code, int):
        return int(exc.code or 0)
    print(exc.code, file=sys.stderr)
    return 1


def in_process(
    *args: str, env: dict[str, str] | None = None, threads: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`harmony ARGS` through `harmony.cli.main` in this process, answered as `run_cli` answers (status,
    stdout, stderr; an uncaught exception is a traceback and status 1, warnings are printed to stderr)
    without the interpreter start-up. What a run may change is put back afterwards: environment
    variables (`env` is set for the call only), the working directory, torch's thread count (`threads`
    sets it for the call), the stop-signal handlers and torch's global random state."""
    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    saved_handlers = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    saved_rng = torch.get_rng_state()
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env or {})
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                    warnings.simplefilter("ignore", quiet)  # a fresh interpreter's defaults
                try:
                    code = main(list(args))
                except SystemExit as exc:  # argparse's usage errors, `SystemExit("message")`
                    code = _exit_code(exc)
                except Exception:
                    traceback.print_exc()
                    code = 1
            for w in caught:
                err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        for sig, handler in saved_handlers.items():
            if handler is not None:  # None: a handler not set from Python, which a run does not replace
                signal.signal(sig, handler)
        torch.set_rng_state(saved_rng)
    return subprocess.CompletedProcess(["harmony", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli() -> Cli:
    """`harmony ...` in this process (see `in_process`): the command's own code without the start-up of
    `run_cli`; keep `run_cli` for what needs a process of its own."""
    return in_process


def trained(out: Path, preset: str) -> Path:
    """`out` after a 6-step run of `preset` (the CLI's code path, in this process); its last checkpoint."""
    proc = in_process("train", "--preset", preset, "--out", str(out), "--max-steps", "6", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP tiny-test run trained for a few steps."""
    return trained(tmp_path_factory.mktemp("clip_run"), "clip-tiny-test")


@pytest.fixture(scope="session")
def harmony_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained(tmp_path_factory.mktemp("harmony_run"), "harmony-tiny-test")


@pytest.fixture(scope="session")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`one_rank(*args)`: the run folder of `harmony ARGS --out ...` in this process with one thread (as each
    rank of the two-rank launch has), run once per session and shared by the tests that compare with it."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(*args: str) -> Path:
        if args not in runs:
            out = tmp_path_factory.mktemp("one_rank")
            proc = in_process(*args, "--out", str(out), threads=1)
            assert proc.returncode == 0, proc.stderr
            runs[args] = out
        return runs[args]

    return run


class TwoRanks:
    """The outcome of the one two-rank launch (tests/two_ranks.py), scenario by scenario."""

    def __init__(self, out: Path, returncode: int, log: str) -> None:
        self.out, self.returncode, self.log = out, returncode, log

    def folder(self, scenario: str) -> Path:
        """The folder of `scenario` once both ranks finished it; otherwise the test fails with what each
        rank reported for this scenario (or, had it not started, the launch's own output)."""
        folder = self.out / scenario
        statuses = [folder / f"rank{rank}.status" for rank in (0, 1)]
        if all(path.exists() and path.read_text() == "ok" for path in statuses):
            return folder
        if not any(path.exists() for path in statuses):
            pytest.fail(
                f"two-rank scenario {scenario} did not run (launch exit {self.returncode}):\n{self.log[-4000:]}"
            )
        report = []
        for rank, path in enumerate(statuses):
            log = folder / f"rank{rank}.log"
            report.append(f"--- rank {rank}: {path.read_text() if path.exists() else 'no status'}")
            if log.exists():
                report.append(f"--- rank {rank} printed:\n{log.read_text()[-3000:]}")
        pytest.fail(f"two-rank scenario {scenario} failed:\n" + "\n".join(report))


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> TwoRanks:
    """Every two-rank scenario, run in one `torchrun --standalone --nproc_per_node 2` launch (gloo, one thread
    per rank): three interpreters for all of them instead of per test."""
    out = tmp_path_factory.mktemp("two_ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "tests.two_ranks", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        log, _ = proc.communicate()
        log += "\n(the launch ran past 900 s and was killed)"
    return TwoRanks(out, proc.returncode, log)
