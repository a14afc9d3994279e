"""SwAV: Sinkhorn-Knopp and the swapped prediction against the authors' published algorithm, the objective on the
towers, the prototypes (normalised, frozen for the first epoch), the queue (used once full, in checkpoints, exact
under accumulation), gradients, 2 ranks == 1 (its run and benchmark: tests/test_method_smoke.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harmony.config import ConfigError
from harmony.models.normalize import normalize
from harmony.objectives.base import StepInfo
from harmony.objectives.swav import SwAVObjective, sinkhorn, swapped_prediction
from harmony.presets import build_config
from tests.conftest import Cli, TwoRanks
from tests.test_accumulation import batches, make_stepper, train
from tests.test_distributed import records
from tests.test_global_batchnorm import direct_batchnorm_mlp
from tests.test_gradients import grads_of, make_task_and_batch, prefixes
from tests.two_ranks import SWAV_QUEUE, three_steps

QUEUE = ("objectives.swav.queue_length=16", "objectives.swav.queue_start_epochs=0")


def authors_sinkhorn(out: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """The authors' `distributed_sinkhorn` on one process, line by line."""
    Q = torch.exp(out / epsilon).t()
    B = Q.shape[1] * 1
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for _ in range(iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def authors_loss(output: torch.Tensor, bs: int, nmb_crops: int, temperature: float = 0.1) -> torch.Tensor:
    """The authors' training loop's loss (crops_for_assign [0, 1], no queue): `output` [crops * bs, K] crop-major."""
    loss = torch.zeros(())
    for crop_id in (0, 1):
        with torch.no_grad():
            q = authors_sinkhorn(output[bs * crop_id : bs * (crop_id + 1)].detach())[-bs:]
        subloss = torch.zeros(())
        for v in [v for v in range(nmb_crops) if v != crop_id]:
            x = output[bs * v : bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (nmb_crops - 1)
    return loss / 2


def test_sinkhorn_is_the_authors_and_balances_the_prototypes() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = (
        F.normalize(torch.randn(12, 5, generator=gen), dim=1) @ F.normalize(torch.randn(4, 5, generator=gen), dim=1).t()
    )
    codes = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(codes, authors_sinkhorn(scores.clone()))
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(12))  # each sample's code is a distribution
    balanced = sinkhorn(scores, 0.05, 200)  # iterated to convergence: every prototype gets N / K samples
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((4,), 3.0), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(codes, balanced, atol=1e-3)


def test_swapped_prediction_is_the_authors_loss() -> None:
    gen = torch.Generator().manual_seed(1)
    output = (
        F.normalize(torch.randn(4 * 6, 8, generator=gen), dim=1)
        @ F.normalize(torch.randn(10, 8, generator=gen), dim=1).t()
    )  # 4 crops x 6 samples against 10 prototypes
    scores = output.unflatten(0, (4, 6))
    codes = torch.stack([sinkhorn(scores[g], 0.05, 3) for g in (0, 1)])
    torch.testing.assert_close(swapped_prediction(scores, codes, 0.1), authors_loss(output, 6, 4))


def test_swav_objective_matches_the_authors_loss_on_the_towers() -> None:
    """The CLS of 2 clean global + 2 local crops, one head call, normalised, scored; the authors' loss on that."""
    task, batch = make_task_and_batch("swav-tiny-test", batch_size=6)
    objective = task.objectives["swav"]
    assert task.teacher is None and task.student.text is None and task.needs.local_crops == 2
    out = objective(task.encode(batch), batch, StepInfo(0, 8))
    images, local = normalize(batch["global"]), normalize(batch["local"])
    with torch.no_grad():
        cls = [task.student.visual(images[g])[:, 0] for g in (0, 1)]
        cls += [task.student.visual(local[v])[:, 0] for v in (0, 1)]
        z = F.normalize(direct_batchnorm_mlp(objective.projector, torch.cat(cls)), dim=1)
        output = z @ objective.prototypes.weight.t()
    torch.testing.assert_close(out.loss, authors_loss(output, 6, 4), rtol=1e-4, atol=1e-5)


def test_swav_head_and_prototypes_are_the_authors() -> None:
    task, _ = make_task_and_batch("swav-tiny-test")
    objective: SwAVObjective = task.objectives["swav"]
    assert [type(m).__name__ for m in objective.projector] == ["Linear", "GlobalBatchNorm1d", "ReLU", "Linear"]
    assert objective.prototypes.bias is None
    torch.testing.assert_close(objective.prototypes.weight.norm(dim=1), torch.ones(32))  # unit rows from the start
    full = build_config("swav-vit-b16").objectives.swav
    assert full is not None
    assert (full.num_prototypes, full.out_dim, full.hidden_dim, full.local_crops) == (3000, 128, 2048, 6)
    assert (full.temperature, full.epsilon, full.sinkhorn_iterations, full.queue_length) == (0.1, 0.05, 3, 0)


def test_prototypes_are_frozen_in_the_first_epoch_and_renormalised_after_each_step() -> None:
    stepper = make_stepper("swav-tiny-test", 1)
    objective = stepper.task.objectives["swav"]
    assert objective.frozen_parameters(StepInfo(3, 4)) == [objective.prototypes.weight]
    assert objective.frozen_parameters(StepInfo(4, 4)) == []
    before = objective.prototypes.weight.detach().clone()
    for batch in batches(stepper, 5):  # 4 steps per epoch: steps 0-3 frozen, step 4 trains them
        stepper.train_step(batch)
        if stepper.step == 4:
            torch.testing.assert_close(objective.prototypes.weight, before)
    assert not torch.allclose(objective.prototypes.weight, before)
    torch.testing.assert_close(objective.prototypes.weight.norm(dim=1), torch.ones(32))


def test_the_queue_fills_with_the_last_embeddings_and_is_used_once_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 8, queue 16: steps 1 and 2 fill it, step 3 uses it; it then holds steps 3 and 2, newest first."""
    stepper = make_stepper("swav-tiny-test", 1, 8, *QUEUE)
    objective = stepper.task.objectives["swav"]
    pending: list[torch.Tensor] = []
    after_step = objective.after_step
    monkeypatch.setattr(objective, "after_step", lambda: (pending.append(objective._pending.clone()), after_step()))
    used = [float(stepper.train_step(batch)["swav_queue_used"]) for batch in batches(stepper, 3)]
    assert used == [0.0, 0.0, 1.0]
    assert [p.shape for p in pending] == [(2, 8, 32)] * 3
    torch.testing.assert_close(objective.queue, torch.cat([pending[2], pending[1]], dim=1))
    assert int(objective.queue_filled) == 16
    assert {"objectives.swav.queue", "objectives.swav.queue_filled"} <= set(stepper.task.state_dict())


def test_a_full_queue_adds_its_rows_to_sinkhorns_columns() -> None:
    task, batch = make_task_and_batch("swav-tiny-test", 6, QUEUE)
    objective = task.objectives["swav"]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        objective.queue.copy_(F.normalize(torch.randn(2, 16, 32, generator=gen), dim=-1))
        objective.queue_filled.fill_(16)
    enc = task.encode(batch)
    loss = objective(enc, batch, StepInfo(0, 8)).loss
    with torch.no_grad():
        views = [enc.clean[0][:, 0], enc.clean[1][:, 0], *enc.local[:, :, 0]]
        z = F.normalize(objective.projector(torch.cat(views)), dim=1)
        scores = (z @ objective.prototypes.weight.t()).unflatten(0, (4, 6))
        queued = objective.queue @ objective.prototypes.weight.t()
        codes = torch.stack([authors_sinkhorn(torch.cat([queued[g], scores[g]]))[-6:] for g in (0, 1)])
    torch.testing.assert_close(loss, swapped_prediction(scores, codes, 0.1))
    without = swapped_prediction(scores, torch.stack([authors_sinkhorn(scores[g].clone()) for g in (0, 1)]), 0.1)
    assert not torch.allclose(loss, without, atol=1e-4)


def test_accumulation_with_the_queue_gives_the_whole_batch_numbers() -> None:
    """The queue is filled once per optimiser step from the whole batch: K = 2 equals K = 1, queue included."""
    reference, ref_state = train("swav-tiny-test", 1, 3, *QUEUE)
    rows, state = train("swav-tiny-test", 2, 3, *QUEUE)
    for want, got in zip(reference, rows, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(state["objectives.swav.queue"], ref_state["objectives.swav.queue"], rtol=1e-4, atol=2e-5)


def test_swav_gradients_reach_head_and_tower() -> None:
    task, batch = make_task_and_batch("swav-tiny-test")
    reached = grads_of(task, "swav", batch)
    assert {"student.visual", "objectives.swav"} <= prefixes(reached)
    assert "objectives.swav.prototypes.weight" in reached


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["swav", "swav_queue"])
def test_swav_two_ranks_times_b_equal_one_rank_times_2b(
    two_ranks: TwoRanks, one_rank: Callable[..., Path], scenario: str
) -> None:
    """Checks Sinkhorn's sums over ranks, the head's global BatchNorm and (with the queue: filled by steps 1-2,
    used at step 3) each rank's share of the queue together: any of them wrong changes the losses of steps 1..3."""
    args = three_steps("swav") if scenario == "swav" else SWAV_QUEUE
    one, two = records(one_rank(*args)), records(two_ranks.folder(scenario) / "run")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_swav"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)
    if scenario == "swav_queue":
        assert [two[step]["swav_queue_used"] for step in (1, 2, 3)] == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("num_prototypes", "0", "must be positive, got 0"), ("epsilon", "0", "must be positive"),
     ("queue_length", "-1", "must be 0 or more, got -1")],
)  # fmt: skip
def test_swav_settings_that_cannot_work_are_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"'objectives.swav.{key}' {message}") as error:
        build_config("swav-tiny-test", [f"objectives.swav.{key}={value}"])
    assert "\n" not in str(error.value)


def test_a_resumed_run_continues_with_its_queue(tmp_path: Path, cli: Cli) -> None:
    """Queue 16 at batch 8: full after step 2, read at steps 3 and 4. Stopped after step 2 and resumed, the run gives
    the losses of the uninterrupted one: the queue came back from the checkpoint."""
    args = ("train", "--preset", "swav-tiny-test", "--data", "builtin:shapes", "--workers", "0", "--no-progress")
    args += ("train.log_every=1", *QUEUE)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli(*args, "--out", str(whole), "--max-steps", "4").returncode == 0
    assert cli(*args, "--out", str(split), "--max-steps", "2").returncode == 0
    resumed = cli(*args, "--out", str(split), "--resume", "auto", "--max-steps", "4")
    assert resumed.returncode == 0, resumed.stderr
    rows, refs = records(split), records(whole)
    assert [rows[step]["swav_queue_used"] for step in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]
    for step in (1, 2, 3, 4):
        assert rows[step]["loss_swav"] == pytest.approx(refs[step]["loss_swav"], rel=1e-5, abs=1e-6), step
