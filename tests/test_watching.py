"""Watching a run: evaluation during training (`train.eval_every`, `eval.*`), the best checkpoint
(`train.keep_best`) and Weights & Biases (`train.wandb`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from harmony.core import checkpoint as ckpt
from tests.conftest import Cli, TwoRanks
from tests.two_ranks import EVAL_RUN

RUN = ("train", "--preset", "harmony-tiny-test", "--workers", "0", "--no-progress", "--batch-size", "8")
RUN += ("train.log_every=1",)
SETS = ("eval.knn_val=builtin:shapes:val", "eval.zeroshot_data=builtin:shapes:val", "eval.workers=0")
TIMING = {"images_per_s", "images_per_s_per_device", "step_time_s", "data_time_s"}


def rows(run: Path) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """(training rows, evaluation rows) of a run's metrics.jsonl, by step."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    training = {r["step"]: r for r in records if "eval/time_s" not in r}
    evaluation = {r["step"]: r for r in records if "eval/time_s" in r}
    assert len(training) + len(evaluation) == len(records)
    return training, evaluation


def same_losses(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> None:
    """Every logged number but the timings equal, exactly, at every step."""
    assert sorted(a) == sorted(b)
    for step in a:
        assert set(a[step]) == set(b[step])
        for key in set(a[step]) - TIMING:
            assert a[step][key] == b[step][key], (step, key)


def harmony_eval(cli: Cli, tmp_path: Path, task: str, run: Path, weights: str, *flags: str) -> dict[str, float]:
    out = tmp_path / f"{task}-{weights}.json"
    args = ("--checkpoint", str(run), "--data", "builtin:shapes:val", "--weights", weights, "--workers", "0")
    cache = ("--cache-dir", str(tmp_path / "cache")) if task == "knn" else ()
    done = cli("eval", task, *args, "--out", str(out), *cache, *flags)
    assert done.returncode == 0, done.stderr
    metrics: dict[str, float] = json.loads(out.read_text())["metrics"]
    return metrics


@pytest.mark.slow
def test_evaluation_rows_leave_the_losses_as_they_were(tmp_path: Path, cli: Cli) -> None:
    """Rows at steps 2 and 4 with the student's and the teacher's values (the default `eval/...` being the teacher's);
    the losses and the final weights of the run equal those of the run without evaluation; the last row equals
    `harmony eval` on the run's checkpoint."""
    watched, plain = tmp_path / "watched", tmp_path / "plain"
    done = cli(*RUN, "--max-steps", "4", "train.eval_every=2", *SETS, "--out", str(watched))
    assert done.returncode == 0, done.stderr
    assert "evaluating zeroshot, knn every 2 steps and at the end" in done.stdout
    assert cli(*RUN, "--max-steps", "4", "--out", str(plain)).returncode == 0
    training, evaluation = rows(watched)
    same_losses(training, rows(plain)[0])
    assert sorted(evaluation) == [2, 4]
    for row in evaluation.values():
        for task in ("knn_top1", "knn_top5", "zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall"):
            assert 0.0 <= row[f"eval/student/{task}"] <= 1.0 and 0.0 <= row[f"eval/teacher/{task}"] <= 1.0
            assert row[f"eval/{task}"] == row[f"eval/teacher/{task}"]
        assert row["eval/time_s"] > 0
    final, reference = ckpt.load(watched / "checkpoints" / "last.pt"), ckpt.load(plain / "checkpoints" / "last.pt")
    assert all(torch.equal(final["model"][k], v) for k, v in reference["model"].items())
    assert torch.equal(final["rng"]["torch"], reference["rng"]["torch"])
    knn = harmony_eval(cli, tmp_path, "knn", watched, "student", "--ks", "20")
    zeroshot = harmony_eval(cli, tmp_path, "zeroshot", watched, "teacher")
    assert evaluation[4]["eval/student/knn_top1"] == knn["k20_top1"]
    assert evaluation[4]["eval/teacher/zeroshot_top1"] == zeroshot["top1"]
    assert (watched / "tensorboard").is_dir()


@pytest.mark.slow
def test_a_resumed_run_with_evaluation_is_exact(tmp_path: Path, cli: Cli) -> None:
    """Continued from its step-1 checkpoint (with gradient accumulation, K = 2), a run evaluating every 2 steps
    logs the same losses and evaluations as the run that was never interrupted."""
    args = (*RUN, "--max-steps", "4", "train.eval_every=2", "train.save_every=1", "train.keep_last=4", *SETS)
    args += ("eval.retrieval_data=builtin:shapes:val", "--accum-steps", "2")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert cli(*args, "--out", str(whole)).returncode == 0
    done = cli(*args, "--resume", str(whole / "checkpoints" / "step_00000001.pt"), "--out", str(resumed))
    assert done.returncode == 0, done.stderr
    (training, evaluation), (ref_training, ref_evaluation) = rows(resumed), rows(whole)
    same_losses(training, {step: row for step, row in ref_training.items() if step > 1})
    assert sorted(evaluation) == [2, 4] and "eval/student/retrieval_mean_recall" in evaluation[4]
    for step, row in evaluation.items():
        assert {k: v for k, v in row.items() if k != "eval/time_s"} == {
            k: v for k, v in ref_evaluation[step].items() if k != "eval/time_s"
        }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("metric", "mode", "extra"),
    [("eval/knn_top1", "max", ("train.eval_every=2", *SETS)), ("loss", "min", ())],
)
def test_keep_best_holds_the_step_of_the_best_logged_value(
    tmp_path: Path, cli: Cli, metric: str, mode: str, extra: tuple[str, ...]
) -> None:
    out = tmp_path / "run"
    args = (*RUN, "--max-steps", "6", f"train.keep_best={metric}", f"train.keep_best_mode={mode}", *extra)
    done = cli(*args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    training, evaluation = rows(out)
    logged = [
        (step, row[metric]) for step, row in sorted((evaluation if metric.startswith("eval/") else training).items())
    ]
    pick = max if mode == "max" else min
    best_value = pick(value for _, value in logged)
    best_step = next(step for step, value in logged if value == best_value)  # the first one: later ties do not win
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == metric and best["value"] == best_value and best["step"] == best_step
    assert ckpt.load(out / "checkpoints" / "best.pt")["step"] == best_step


@pytest.mark.slow
def test_weights_and_biases_offline_gets_the_scalars_and_the_config(tmp_path: Path, cli: Cli) -> None:
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = cli(*RUN, "--max-steps", "2", "train.wandb=harmony-tests", "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # W&B's record log, what `wandb sync` uploads
    held = log.read_bytes()
    for row in rows(out)[0].values():
        for key in ("loss", "loss_clip", "lr", "grad_norm"):
            assert key.encode() in held and json.dumps(row[key]).encode() in held, (row["step"], key)
    assert b"harmony-tiny-test" in held and b"eval_every" in held  # the config
    assert (out / "tensorboard").is_dir()


BAD = [
    (("train.eval_every=5",), "train.eval_every"),
    (("train.eval_every=5", "eval.knn_val=/no/such/folder"), "/no/such/folder"),
    (("eval.knn_train=builtin:shapes",), "eval.knn_train"),
    (("train.keep_best=eval/zeroshot_top1", "eval.knn_val=builtin:shapes:val"), "eval.zeroshot_data"),
    (("train.keep_best=eval/knn_top7", "eval.knn_val=builtin:shapes:val"), "eval/knn_top7"),
    (("train.keep_best=no_such_metric",), "no_such_metric"),
    (("eval.knn_val=builtin:shapes:val", "eval.knn.kk=5"), "eval.knn.kk"),
    (("eval.knn_val=builtin:shapes:val", "eval.knn.ks=0"), "eval.knn.ks"),
    (("eval.zeroshot_data=builtin:shapes:val", "eval.zeroshot.max_eval=lots"), "eval.zeroshot.max_eval"),
]


@pytest.mark.parametrize(("settings", "named"), BAD)
def test_bad_watch_settings_are_one_line(tmp_path: Path, cli: Cli, settings: tuple[str, ...], named: str) -> None:
    out = tmp_path / "run"
    done = cli(*RUN, "--max-steps", "2", *settings, "eval.workers=0", "--out", str(out))
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert named in done.stderr
    assert not (out / "checkpoints").exists()


def test_evaluation_needs_a_text_tower_for_text_tasks_and_wandb_its_extra(
    tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("train", "--preset", "mae-tiny-test", "--workers", "0", "--no-progress", "--max-steps", "2")
    done = cli(*args, "eval.zeroshot_data=builtin:shapes:val", "--out", str(tmp_path / "mae"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "eval.zeroshot_data" in done.stderr and "text tower" in done.stderr
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    done = cli(*RUN, "--max-steps", "2", "train.wandb=p", "--out", str(tmp_path / "wandb"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "harmony-vl[wandb]" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_evaluate_as_one_process(
    tmp_path: Path, cli: Cli, two_ranks: TwoRanks, one_rank: Callable[..., Path], strategy: str
) -> None:
    """Each rank encodes its half of every set's batches; gathered, the numbers are one process's: `harmony eval`
    on the two-rank run's own checkpoint gives its last row exactly, and the rows match the one-process run's."""
    run = two_ranks.folder(f"eval_{strategy}") / "run"
    evaluation = rows(run)[1]
    assert sorted(evaluation) == [2, 4]
    flags = ("--batch-size", "8")
    knn = harmony_eval(cli, tmp_path, "knn", run, "teacher", "--ks", "20", *flags)
    zeroshot = harmony_eval(cli, tmp_path, "zeroshot", run, "student", *flags)
    retrieval = harmony_eval(cli, tmp_path, "retrieval", run, "teacher", *flags)
    last = evaluation[4]
    assert last["eval/teacher/knn_top1"] == knn["k20_top1"] and last["eval/teacher/knn_top5"] == knn["k20_top5"]
    assert last["eval/student/zeroshot_top1"] == zeroshot["top1"]
    assert last["eval/teacher/retrieval_mean_recall"] == pytest.approx(retrieval["mean_recall"], abs=1e-6)
    _, reference = rows(one_rank(*EVAL_RUN))
    for step, row in evaluation.items():
        for key in row.keys() - {"eval/time_s"}:
            assert row[key] == pytest.approx(reference[step][key], abs=1e-6), (step, key)
