"""MoCo v2: the formula against a direct computation and against the paper's pseudocode, the queue (the last
keys of the global batch, enqueued once per optimiser step, saved and resumed), gradients, 2 ranks == 1 (its
run and benchmark: tests/test_method_smoke.py; K micro-batches == 1: tests/test_accumulation.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harmony.config import ConfigError
from harmony.core import checkpoint as ckpt
from harmony.models.normalize import normalize
from harmony.objectives.base import StepInfo
from harmony.objectives.mocov2 import enqueue, mocov2_loss
from harmony.presets import build_config
from tests.conftest import Cli, TwoRanks
from tests.test_accumulation import batches, make_stepper
from tests.test_distributed import records
from tests.test_gradients import grads_of, make_task_and_batch, prefixes
from tests.two_ranks import MOCOV2_RUN

Tensor = torch.Tensor


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True)


def direct_loss(q: Tensor, k: Tensor, negatives: Tensor, tau: float) -> Tensor:
    """mean_i -log( exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_j exp(q_i.n_j/tau)) ), one row at a time."""
    terms = []
    for i in range(q.shape[0]):
        scores = [float(q[i] @ k[i]) / tau] + [float(q[i] @ n) / tau for n in negatives]
        top = max(scores)
        terms.append(top + math.log(sum(math.exp(s - top) for s in scores)) - scores[0])
    return torch.tensor(sum(terms) / len(terms))


class PaperMoCo:
    """Algorithm 1 of the MoCo paper and the authors' `_dequeue_and_enqueue`, written from them: the queue is
    C x K, the positive logit first, labels 0; keys replace the oldest K-divisible slice at `ptr`."""

    def __init__(self, queue_ck: Tensor) -> None:
        self.queue, self.ptr = queue_ck.clone(), 0

    def loss(self, q: Tensor, k: Tensor, t: float) -> Tensor:
        n, c = q.shape
        l_pos = torch.bmm(q.view(n, 1, c), k.view(n, c, 1)).view(n, 1)
        l_neg = torch.mm(q.view(n, c), self.queue)
        logits = torch.cat([l_pos, l_neg], dim=1)
        return torch.nn.CrossEntropyLoss()(logits / t, torch.zeros(n, dtype=torch.long))

    def dequeue_and_enqueue(self, keys: Tensor) -> None:
        batch_size = keys.shape[0]
        assert self.queue.shape[1] % batch_size == 0
        self.queue[:, self.ptr : self.ptr + batch_size] = keys.T
        self.ptr = (self.ptr + batch_size) % self.queue.shape[1]


def test_mocov2_loss_is_infonce_against_the_key_and_the_queue() -> None:
    """A batch of 8 with a queue of 64: the direct computation with those 64 negatives, and the paper's code."""
    gen = torch.Generator().manual_seed(0)
    q = unit(torch.randn(8, 16, generator=gen)).requires_grad_(True)
    k = unit(torch.randn(8, 16, generator=gen)).requires_grad_(True)
    queue = unit(torch.randn(64, 16, generator=gen))
    loss = mocov2_loss(q, k, queue, 0.2)
    torch.testing.assert_close(loss, direct_loss(q.detach(), k.detach(), queue, 0.2))
    torch.testing.assert_close(loss, PaperMoCo(queue.t()).loss(q.detach(), k.detach(), 0.2))
    loss.backward()
    assert k.grad is None and q.grad is not None and q.grad.abs().sum() > 0  # gradient on the queries only
    eye = torch.eye(4)
    assert mocov2_loss(eye, eye, -eye, 0.01).item() < 1e-6  # every query on its key, away from the queue
    torch.testing.assert_close(mocov2_loss(eye[:2], eye[:2], eye[:2].repeat(3, 1), 1e9), torch.tensor(math.log(7)))


def test_enqueue_is_the_papers_ring_and_wraps_at_any_size() -> None:
    gen = torch.Generator().manual_seed(1)
    queue = unit(torch.randn(12, 3, generator=gen))
    paper = PaperMoCo(queue.t())
    pointer = torch.zeros((), dtype=torch.long)
    for _ in range(5):  # 5 x 4 keys through 12 rows: wraps, as the paper's (K divisible by the batch)
        keys = unit(torch.randn(4, 3, generator=gen))
        enqueue(queue, pointer, keys)
        paper.dequeue_and_enqueue(keys)
        torch.testing.assert_close(queue, paper.queue.t())
        assert int(pointer) == paper.ptr
    keys = torch.arange(30.0).view(10, 3)  # 10 keys into 12 rows from row 8: rows 8..11, then 0..5
    enqueue(queue, pointer, keys)
    assert int(pointer) == 6
    torch.testing.assert_close(queue[8:], keys[:4])
    torch.testing.assert_close(queue[:6], keys[4:])
    many = torch.arange(45.0).view(15, 3)  # more keys than rows: the last 12 stay, the 15th at row 6 + 14 = 8
    enqueue(queue, pointer, many)
    assert int(pointer) == (6 + 15) % 12
    torch.testing.assert_close(queue[(6 + torch.arange(3, 15)) % 12], many[3:])


def key_of(task: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The keys of a batch, directly: the EMA teacher's CLS of crop 0 through the EMA head, normalised."""
    objective = task.objectives["mocov2"]
    with torch.no_grad():
        return unit(objective.key_head(task.teacher.visual(normalize(batch["global"][0]))[:, 0]))


def test_mocov2_objective_matches_a_direct_computation_on_both_towers() -> None:
    """Student query of crop 1 against the EMA teacher's key of crop 0 and the 64 queued negatives."""
    task, batch = make_task_and_batch("mocov2-tiny-test", batch_size=8)
    objective = task.objectives["mocov2"]
    assert task.teacher is not None and task.student.text is None
    assert objective.queue.shape == (64, 32) and torch.allclose(objective.queue.norm(dim=1), torch.ones(64))
    with torch.no_grad():  # a key encoder that is not (yet) the query encoder's copy: the wrong tower shows
        for param in [*task.teacher.parameters(), *objective.key_head.parameters()]:
            param.mul_(0.9)
    loss = objective(task.encode(batch), batch, StepInfo(0, 8)).loss
    with torch.no_grad():
        q = unit(objective.head(task.student.visual(normalize(batch["global"][1]))[:, 0]))
    k = key_of(task, batch)
    tau = task.cfg.objectives.mocov2.temperature
    assert tau == 0.2
    torch.testing.assert_close(loss, direct_loss(q, k, objective.queue, tau))
    assert not torch.allclose(loss, direct_loss(q, k * 0.9, objective.queue, tau), atol=1e-4)


def test_the_queue_holds_the_last_keys_and_the_pointer_after_three_steps() -> None:
    """Queue of 20, batches of 8: after 3 steps the 24 keys wrapped once (rows 0..3 = keys 20..23), pointer 4;
    the keys are those of the key encoder before each step's EMA update."""
    stepper = make_stepper("mocov2-tiny-test", 1, 8, "objectives.mocov2.queue_size=20")
    objective = stepper.task.objectives["mocov2"]
    keys = []
    for batch in batches(stepper, 3):
        keys.append(key_of(stepper.task, batch))
        stepper.train_step(batch)
    every = torch.cat(keys)
    assert int(objective.queue_pointer) == 24 % 20
    torch.testing.assert_close(objective.queue[:4], every[20:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(objective.queue[4:], every[4:20], rtol=1e-5, atol=1e-6)
    assert stepper.cfg.teacher.momentum_start == stepper.cfg.teacher.momentum_end == 0.999


def test_every_micro_batch_sees_the_queue_of_the_step() -> None:
    """With K = 2 the queue moves once, after both micro-batches, by the whole batch's keys in order."""
    stepper = make_stepper("mocov2-tiny-test", 2, 8)
    objective = stepper.task.objectives["mocov2"]
    seen: list[Tensor] = []
    forward = objective.forward
    objective.forward = lambda *a: (seen.append(objective.queue.clone()), forward(*a))[1]  # type: ignore[method-assign]
    batch = batches(stepper, 1)[0]
    before, key = objective.queue.clone(), key_of(stepper.task, batch)
    stepper.train_step(batch)
    assert len(seen) == 2 and all(torch.equal(s, before) for s in seen)
    torch.testing.assert_close(objective.queue[:8], key, rtol=1e-5, atol=1e-6)
    assert torch.equal(objective.queue[8:], before[8:]) and int(objective.queue_pointer) == 8


def test_mocov2_gradients_reach_the_head_never_the_key_encoder() -> None:
    task, batch = make_task_and_batch("mocov2-tiny-test")
    reached = grads_of(task, "mocov2", batch)
    assert {"student.visual", "objectives.mocov2"} <= prefixes(reached)
    assert not any(n.startswith(("teacher.", "objectives.mocov2.key_head.")) for n in reached)
    assert [name for name, _ in task.objectives["mocov2"].named_buffers()] == ["queue", "queue_pointer"]


def test_the_key_head_follows_the_query_head_by_ema() -> None:
    task, _ = make_task_and_batch("mocov2-tiny-test")
    objective = task.objectives["mocov2"]
    with torch.no_grad():
        for p in objective.head.parameters():
            p.add_(1.0)
    online = [p.detach().clone() for p in objective.head.parameters()]
    target = [p.detach().clone() for p in objective.key_head.parameters()]
    task.after_step(momentum=0.25)
    for new, t, o in zip(objective.key_head.parameters(), target, online, strict=True):
        torch.testing.assert_close(new, 0.25 * t + 0.75 * o)


RUN = ("--preset", "mocov2-tiny-test", "--data", "builtin:shapes", "--workers", "0", "--no-progress")
RUN += ("train.log_every=1",)


@pytest.mark.slow
def test_a_resumed_run_continues_with_the_queue(tmp_path: Path, cli: Cli, one_rank: Callable[..., Path]) -> None:
    split = tmp_path / "split"
    assert cli("train", *RUN, "--out", str(split), "--max-steps", "2").returncode == 0
    second = cli("train", *RUN, "--out", str(split), "--resume", "auto", "--max-steps", "4")
    assert second.returncode == 0, second.stderr
    whole = one_rank("train", *RUN, "--max-steps", "4")
    rows, refs = records(split), records(whole)
    assert sorted(rows) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert rows[step]["loss_mocov2"] == pytest.approx(refs[step]["loss_mocov2"], rel=1e-5), step
    state, ref = (ckpt.load(run / "checkpoints" / "last.pt")["model"] for run in (split, whole))
    torch.testing.assert_close(state["objectives.mocov2.queue"], ref["objectives.mocov2.queue"])
    assert int(state["objectives.mocov2.queue_pointer"]) == int(ref["objectives.mocov2.queue_pointer"]) == 32


@pytest.mark.slow
def test_mocov2_two_ranks_times_b_equal_one_rank_times_2b(two_ranks: TwoRanks, one_rank: Callable[..., Path]) -> None:
    """The queue is filled from the keys of the global batch, in rank order: losses and queue as one process."""
    one, two_folder = one_rank(*MOCOV2_RUN), two_ranks.folder("mocov2") / "run"
    a, b = records(one), records(two_folder)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_mocov2"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
    state, ref = (ckpt.load(run / "checkpoints" / "last.pt")["model"] for run in (two_folder, one))
    assert int(state["objectives.mocov2.queue_pointer"]) == int(ref["objectives.mocov2.queue_pointer"]) == 24
    torch.testing.assert_close(state["objectives.mocov2.queue"], ref["objectives.mocov2.queue"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("key", "message"), [("queue_size", "must be positive, got 0"), ("temperature", "must be positive")]
)
def test_mocov2_settings_must_be_positive(key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        build_config("mocov2-tiny-test", [f"objectives.mocov2.{key}=0"])
    assert f"objectives.mocov2.{key}" in str(err.value) and "\n" not in str(err.value)
