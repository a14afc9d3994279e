"""MoCo v3: formula, wiring on both towers (query student, key EMA teacher), gradients, EMA, 2 ranks == 1 (its
run and benchmark: tests/test_method_smoke.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harmony.config import ConfigError
from harmony.models.normalize import normalize
from harmony.objectives.base import StepInfo
from harmony.objectives.mocov3 import mocov3_contrast, mocov3_loss
from harmony.presets import build_config
from tests.conftest import TwoRanks
from tests.test_distributed import records
from tests.test_global_batchnorm import direct_batchnorm_mlp
from tests.test_gradients import grads_of, make_task_and_batch, prefixes
from tests.two_ranks import MOCOV3_RUN


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def direct_contrast(q: torch.Tensor, k_all: torch.Tensor, tau: float, offset: int) -> torch.Tensor:
    """2 tau * mean_i -log( exp(q_i.k_{offset+i}/tau) / sum_j exp(q_i.k_j/tau) ), one row at a time."""
    terms = []
    for i in range(q.shape[0]):
        scores = [float(q[i] @ k_all[j]) / tau for j in range(k_all.shape[0])]
        top = max(scores)
        log_partition = top + math.log(sum(math.exp(s - top) for s in scores))
        terms.append(log_partition - scores[offset + i])
    return torch.tensor(2 * tau * sum(terms) / len(terms))


def test_mocov3_contrast_is_infonce_over_the_gathered_keys_scaled_by_two_tau() -> None:
    gen = torch.Generator().manual_seed(0)
    q = unit(torch.randn(3, 6, generator=gen)).requires_grad_(True)
    keys = unit(torch.randn(6, 6, generator=gen)).requires_grad_(True)  # 2 ranks x 3 rows, this is rank 1
    loss = mocov3_contrast(q, keys, 0.2, offset=3)
    torch.testing.assert_close(loss, direct_contrast(q.detach(), keys.detach(), 0.2, offset=3))
    loss.backward()
    assert keys.grad is None and q.grad is not None and q.grad.abs().sum() > 0  # gradient on the queries only
    eye = torch.eye(4)
    assert mocov3_contrast(eye, eye, 0.01, offset=0).item() < 1e-6  # every query on its own key: the minimum
    torch.testing.assert_close(  # all keys alike: log N, times 2 tau
        mocov3_contrast(eye[:2], eye[:1].expand(4, 4), 0.2, offset=0), torch.tensor(0.4 * math.log(4))
    )


def test_mocov3_loss_pairs_each_view_with_the_other_views_keys() -> None:
    gen = torch.Generator().manual_seed(1)
    q_a, q_b, k_a, k_b = (unit(torch.randn(4, 5, generator=gen)) for _ in range(4))
    loss = mocov3_loss(q_a, q_b, k_a, k_b, 0.2, offset=0)
    direct = direct_contrast(q_a, k_b, 0.2, 0) + direct_contrast(q_b, k_a, 0.2, 0)
    torch.testing.assert_close(loss, direct)
    same_view = direct_contrast(q_a, k_a, 0.2, 0) + direct_contrast(q_b, k_b, 0.2, 0)
    assert not torch.allclose(loss, same_view, atol=1e-3)


def test_mocov3_heads_are_the_papers() -> None:
    """Projector Linear-BN-ReLU x2, Linear-BN (no affine); predictor Linear-BN-ReLU, Linear-BN (no affine)."""
    task, _ = make_task_and_batch("mocov3-tiny-test")
    objective = task.objectives["mocov3"]
    block = ["Linear", "GlobalBatchNorm1d", "ReLU"]
    assert [type(m).__name__ for m in objective.projector] == [*block, *block, "Linear", "GlobalBatchNorm1d"]
    assert [type(m).__name__ for m in objective.predictor] == [*block, "Linear", "GlobalBatchNorm1d"]
    assert not objective.projector[-1].affine and not objective.predictor[-1].affine
    cfg = task.cfg.objectives.mocov3
    assert objective.predictor[0].weight.shape == (cfg.hidden_dim, cfg.out_dim)
    assert task.cfg.teacher.momentum_start == 0.99 and task.cfg.teacher.momentum_end == 1.0


def test_mocov3_objective_matches_a_direct_computation_on_both_towers() -> None:
    """Student queries of crop a against the EMA teacher's keys of crop b (and b against a)."""
    task, batch = make_task_and_batch("mocov3-tiny-test")
    objective = task.objectives["mocov3"]
    assert task.teacher is not None and task.student.text is None
    with torch.no_grad():  # a key encoder that is not (yet) the query encoder's copy: the wrong tower shows
        for param in [*task.teacher.parameters(), *objective.target_projector.parameters()]:
            param.mul_(0.9)
    loss = objective(task.encode(batch), batch, StepInfo(0, 8)).loss
    images = normalize(batch["global"])
    with torch.no_grad():
        student = [task.student.visual(images[g])[:, 0] for g in (0, 1)]
        teacher = [task.teacher.visual(images[g])[:, 0] for g in (0, 1)]
        q = [
            unit(direct_batchnorm_mlp(objective.predictor, direct_batchnorm_mlp(objective.projector, s)))
            for s in student
        ]
        k = [unit(direct_batchnorm_mlp(objective.target_projector, t)) for t in teacher]
    tau = task.cfg.objectives.mocov3.temperature
    assert tau == 0.2
    torch.testing.assert_close(loss, direct_contrast(q[0], k[1], tau, 0) + direct_contrast(q[1], k[0], tau, 0))
    same_view = direct_contrast(q[0], k[0], tau, 0) + direct_contrast(q[1], k[1], tau, 0)
    assert not torch.allclose(loss, same_view, atol=1e-4)


def test_mocov3_gradients_reach_projector_and_predictor_never_the_key_encoder() -> None:
    task, batch = make_task_and_batch("mocov3-tiny-test")
    reached = grads_of(task, "mocov3", batch)
    assert {"student.visual", "objectives.mocov3"} <= prefixes(reached)
    assert any(n.startswith("objectives.mocov3.predictor.") for n in reached)
    assert any(n.startswith("objectives.mocov3.projector.") for n in reached)
    assert not any(n.startswith(("teacher.", "objectives.mocov3.target_projector.")) for n in reached)
    assert not any(p.requires_grad for p in task.objectives["mocov3"].target_projector.parameters())


def test_mocov3_target_projector_follows_the_online_one_by_ema() -> None:
    task, _ = make_task_and_batch("mocov3-tiny-test")
    objective = task.objectives["mocov3"]
    with torch.no_grad():
        for p in objective.projector.parameters():
            p.add_(1.0)
    online = [p.detach().clone() for p in objective.projector.parameters()]
    target = [p.detach().clone() for p in objective.target_projector.parameters()]
    assert target  # the weights of the projector (its output BN has none)
    task.after_step(momentum=0.25)
    for new, t, o in zip(objective.target_projector.parameters(), target, online, strict=True):
        torch.testing.assert_close(new, 0.25 * t + 0.75 * o)


@pytest.mark.slow
def test_mocov3_two_ranks_times_b_equal_one_rank_times_2b(two_ranks: TwoRanks, one_rank: Callable[..., Path]) -> None:
    """Checks the gathered keys and their labels (rank * B offsets), the cross-rank BatchNorm of all three
    heads and the data sharding together: any of them wrong changes the losses of steps 1..3."""
    one, two = records(one_rank(*MOCOV3_RUN)), records(two_ranks.folder("mocov3") / "run")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_mocov3"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.parametrize(
    ("key", "message"), [("hidden_dim", "must be positive, got 0"), ("temperature", "must be positive")]
)
def test_mocov3_sizes_and_temperature_must_be_positive(key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"'objectives.mocov3.{key}' {message}") as error:
        build_config("mocov3-tiny-test", [f"objectives.mocov3.{key}=0"])
    assert "\n" not in str(error.value)
