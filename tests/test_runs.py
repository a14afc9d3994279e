"""Run folders and resuming from the command line: a used --out is refused, one process per folder,
a resumed run keeps its own config, Ctrl-C saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harmony.cli import main
from harmony.core import checkpoint as ckpt
from harmony.train.preemption import StopRequest
from harmony.train.runfolder import LOCK_FILE
from tests.conftest import REPO, Cli

TRAIN = ["train", "--preset", "clip-tiny-test", "--workers", "0", "--no-progress", "train.log_every=2"]


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(out: Path, *extra: str) -> int:
    return main([*TRAIN, "--out", str(out), *extra])


def test_new_run_into_a_used_folder_is_refused_and_overwrite_starts_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert train(out, "--max-steps", "8", "train.save_every=2", "train.keep_last=2") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last.pt",
        "step_00000006.pt",
        "step_00000008.pt",
    ]
    capsys.readouterr()

    assert train(out, "--max-steps", "4") == 1  # the old code trained and left step_6/8 behind
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume auto" in err and "--overwrite" in err and "not empty" in err
    assert steps_logged(out) == [2, 4, 6, 8], "the refused run wrote nothing"

    (out / "notes.txt").write_text("mine")
    assert train(out, "--max-steps", "4", "--overwrite") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]
    assert steps_logged(out) == [2, 4]
    assert (out / "notes.txt").read_text() == "mine", "--overwrite deletes only the previous run's files"
    assert train(out, "--resume", "auto", "--max-steps", "6") == 0
    assert steps_logged(out) == [2, 4, 6], "resume continues the new run, not the old step_8"


def test_resume_and_overwrite_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path, "--resume", "auto", "--overwrite") == 2
    assert "give one of them" in capsys.readouterr().err


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from harmony.train.runfolder import claim; "
            "claim(Path(sys.argv[1]), resume=False, overwrite=False); print('locked', flush=True); time.sleep(120)",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert train(tmp_path, "--max-steps", "2") == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "another harmony process" in err and err.count("\n") == 1
        assert train(tmp_path, "--resume", "auto", "--max-steps", "2") == 1, "resuming is refused as well"
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE], "nothing was written"
    finally:
        holder.kill()  # the kernel drops the lock with the process
        holder.wait()
    assert train(tmp_path, "--max-steps", "2") == 0, "a lock left by a killed process does not block"


def test_resume_keeps_the_runs_own_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert train(out, "--max-steps", "2", "optim.lr=0.002", "--seed", "3") == 0
    started = yaml.safe_load((out / "config.yaml").read_text())
    capsys.readouterr()

    # the old code took the preset's defaults: "changed settings: optim.lr 0.002 -> 0.001, train.seed 3 -> 0"
    assert main(["train", "--preset", "clip-tiny-test", "--out", str(out), "--resume", "auto", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == started
    assert main(["train", "--out", str(out), "--resume", "auto", "--epochs", "4", "--print-config"]) == 0
    resumed = yaml.safe_load(capsys.readouterr().out)
    assert resumed["train"].pop("epochs") == 4.0 and started["train"].pop("epochs") == 1
    assert resumed == started

    assert main(["train", "--out", str(out), "--resume", "auto", "--max-steps", "4", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith("with changed settings: train.max_steps: 2 -> 4") for line in lines), lines
    assert ckpt.load(out / "checkpoints" / "last.pt")["step"] == 4
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.002


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (["model.embed_dim=64"], "model.embed_dim"),
        (["objectives.mae.weight=1"], "objectives.mae"),
        (["--batch-size", "16"], "train.batch_size"),
        (["--seed", "1"], "train.seed"),
        (["--data", "builtin:shapes:val"], "data_spec"),
        (["optim.lr=0.01"], "optim.lr"),
    ],
)
def test_resume_refuses_changes_that_break_exactness(
    tmp_path: Path, clip_checkpoint: Path, capsys: pytest.CaptureFixture[str], change: list[str], key: str
) -> None:
    run = clip_checkpoint.parent.parent
    assert main(["train", "--out", str(run), "--resume", "auto", *change, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and "--force" in err


def test_resume_with_force_accepts_the_change_and_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path, "--max-steps", "2") == 0
    assert main(["train", "--out", str(tmp_path), "--preset", "harmony-tiny-test", "--resume", "auto"]) == 2
    assert "trained with preset 'clip-tiny-test', not 'harmony-tiny-test'" in capsys.readouterr().err
    capsys.readouterr()
    args = ["train", "--out", str(tmp_path), "--resume", "auto", "--max-steps", "4", "optim.lr=0.01", "--force"]
    assert main([*args, "--no-progress"]) == 0
    assert "changed settings: optim.lr: 0.001 -> 0.01; train.max_steps: 2 -> 4" in capsys.readouterr().out


def test_resume_of_an_empty_folder_needs_a_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path), "--resume", "auto"]) == 2
    assert "holds no run to continue; give --preset" in capsys.readouterr().err


def test_ctrl_c_stops_after_the_step_saves_and_resume_continues(tmp_path: Path, cli: Cli) -> None:
    cmd = [sys.executable, "-m", "harmony.cli", *TRAIN, "--workers", "1", "--out", str(tmp_path), "--max-steps", "400"]
    cmd += ["train.log_every=1"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # one line per log step
        if " step 3/400 " in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGINT" in out and "Ctrl-C again to abort" in err and "Traceback" not in err
    saved = ckpt.load(tmp_path / "checkpoints" / "last.pt")["step"]
    assert 3 <= saved < 400 and steps_logged(tmp_path)[-1] == saved
    resume = ["--workers", "1", "--resume", "auto", "--max-steps", str(saved + 2)]
    resumed = cli(*TRAIN, "--out", str(tmp_path), *resume)
    assert resumed.returncode == 0, resumed.stderr
    assert f"(step {saved})" in resumed.stdout
    assert saved in steps_logged(tmp_path) and steps_logged(tmp_path)[-1] == saved + 2


def test_a_second_ctrl_c_aborts_at_once() -> None:
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0)  # let the interpreter run the handler
        assert stop.requested(agree=True) and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_train_into_an_unwritable_out_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert train(blocker / "run", "--max-steps", "1") == 1  # the old code: NotADirectoryError traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lies under" in err and "which is a file" in err
    assert train(blocker, "--max-steps", "1") == 1
    assert "is a file; give a directory path" in capsys.readouterr().err


def test_resuming_another_runs_checkpoint_into_a_used_folder_is_refused(
    tmp_path: Path, clip_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    assert train(mine, "--max-steps", "8", "train.save_every=4") == 0
    capsys.readouterr()
    theirs = ["--out", str(mine), "--resume", str(clip_checkpoint), "--max-steps", "8", "--no-progress"]
    assert main(["train", *theirs]) == 1  # else a later --resume auto would pick our step_8 over theirs
    assert "would mix the two" in capsys.readouterr().err
    assert main(["train", *theirs, "--overwrite"]) == 0
    assert "step_00000004.pt" not in {p.name for p in (mine / "checkpoints").iterdir()}, "our old run is gone"
    assert steps_logged(mine) == [8] and ckpt.load(mine / "checkpoints" / "last.pt")["step"] == 8


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.yaml").write_text("my own project settings")
    assert train(tmp_path, "--max-steps", "1", "--overwrite") == 1
    assert "not a Harmony run" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == "my own project settings"


def test_a_run_killed_before_its_first_checkpoint_resumes_from_scratch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path, "--max-steps", "2", "optim.lr=0.003") == 0
    for path in (tmp_path / "checkpoints").iterdir():  # as if killed before the first save
        path.unlink()
    assert train(tmp_path, "--max-steps", "2") == 1
    assert main(["train", "--out", str(tmp_path), "--resume", "auto", "--no-progress"]) == 0
    assert steps_logged(tmp_path) == [2], "the killed run's lines were replaced"
    assert ckpt.load(tmp_path / "checkpoints" / "last.pt")["config"]["optim"]["lr"] == 0.003


def test_an_edited_config_yaml_is_reported_not_silently_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path, "--max-steps", "2") == 0
    assert main(["train", "--out", str(tmp_path), "--resume", "auto", "--print-config"]) == 0
    assert capsys.readouterr().err == "", "an untouched run folder resumes without a note"
    config = tmp_path / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.001", "lr: 0.01"))
    assert main(["train", "--out", str(tmp_path), "--resume", "auto", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert "config.yaml differs from the config stored in" in err and "pass changes as key=value" in err
    assert yaml.safe_load(out)["optim"]["lr"] == 0.001


def test_resume_auto_with_only_unreadable_checkpoints_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train(tmp_path, "--max-steps", "2") == 0
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")  # e.g. a full disk during a copy
    assert main(["train", "--out", str(tmp_path), "--resume", "auto", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "an empty file (0 bytes)" in err and "--overwrite" in err
    assert steps_logged(tmp_path) == [2], "the run's history was not thrown away"


def test_another_ranks_write_probe_does_not_make_the_folder_used(tmp_path: Path) -> None:
    """Every process of a run checks that --out is writable with a short-lived probe file; the rank that claims
    the folder may see another rank's probe and must not take it for an earlier run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".harmony-write-test-x1y2").write_text("")
    assert train(out, "--max-steps", "1") == 0
