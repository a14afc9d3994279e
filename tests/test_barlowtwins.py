"""Barlow Twins: the formula against a direct computation and the paper's pseudocode, the objective on the towers,
its projector, gradients, 2 ranks == 1 (its run and benchmark: tests/test_method_smoke.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harmony.config import ConfigError
from harmony.models.normalize import normalize
from harmony.objectives.barlowtwins import barlow_twins_loss, cross_correlation
from harmony.objectives.base import StepInfo
from harmony.presets import build_config
from tests.conftest import TwoRanks
from tests.test_distributed import records
from tests.test_global_batchnorm import direct_batchnorm_mlp
from tests.test_gradients import grads_of, make_task_and_batch, prefixes
from tests.two_ranks import three_steps


def paper_pseudocode(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float) -> torch.Tensor:
    """Algorithm 1 of the paper, line by line (`z.std(0)` is the unbiased standard deviation)."""
    n, d = z_a.shape
    z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0)
    z_b_norm = (z_b - z_b.mean(0)) / z_b.std(0)
    c = torch.mm(z_a_norm.T, z_b_norm) / n
    c_diff = (c - torch.eye(d)).pow(2)
    off = ~torch.eye(d, dtype=torch.bool)
    c_diff[off] = c_diff[off] * lambd
    return c_diff.sum()


def direct_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float) -> float:
    """sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2, C_ij = sum_b z_a[b, i] z_b[b, j] / N, entry by entry."""
    n, d = z_a.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(float(z_a[b, i]) * float(z_b[b, j]) for b in range(n)) / n
            total += (1.0 - c) ** 2 if i == j else lambd * c**2
    return total


def unbiased_standardise(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(0)) / z.std(0)


def test_the_loss_is_the_papers_pseudocode_and_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    norm_a, norm_b = unbiased_standardise(z_a), unbiased_standardise(z_b)
    loss, on_diagonal, off = barlow_twins_loss(cross_correlation(norm_a, norm_b, global_batch=6), 5e-3)
    torch.testing.assert_close(loss, paper_pseudocode(z_a, z_b, 5e-3))
    assert loss.item() == pytest.approx(direct_loss(norm_a, norm_b, 5e-3), rel=1e-5)
    torch.testing.assert_close(loss, on_diagonal + 5e-3 * off)
    same = barlow_twins_loss(cross_correlation(norm_a, norm_a, global_batch=6), 5e-3)[1]
    assert same.item() == pytest.approx(5 * (1 - 5 / 6) ** 2, rel=1e-5)  # C_ii = (N - 1) / N for a view with itself


def test_barlowtwins_objective_matches_the_authors_computation_on_the_towers() -> None:
    """Projector, then BatchNorm without affine (biased variance, as the authors' code: the pseudocode's unbiased
    std differs by N / (N - 1)), the cross-correlation over the batch; student towers on both crops."""
    task, batch = make_task_and_batch("barlowtwins-tiny-test", batch_size=6)
    objective = task.objectives["barlowtwins"]
    assert task.teacher is None and task.student.text is None
    lambd = task.cfg.objectives.barlowtwins.lambd
    assert lambd == 5e-3
    out = objective(task.encode(batch), batch, StepInfo(0, 8))
    images = normalize(batch["global"])
    with torch.no_grad():
        z = [direct_batchnorm_mlp(objective.projector, task.student.visual(images[g])[:, 0]) for g in (0, 1)]
    assert z[0].std(0, unbiased=False).mean().item() == pytest.approx(1.0, abs=1e-3)
    expected = direct_loss(z[0], z[1], lambd)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    biased_to_unbiased = (5 / 6) ** 0.5  # the pseudocode's normalisation on the same projections
    pseudocode = paper_pseudocode(z[0], z[1], lambd).item()
    rescaled = direct_loss(z[0] * biased_to_unbiased, z[1] * biased_to_unbiased, lambd)
    assert pseudocode == pytest.approx(rescaled, rel=1e-3)
    assert out.metrics["barlowtwins_on_diag"] + lambd * out.metrics["barlowtwins_off_diag"] == pytest.approx(
        out.loss.item(), rel=1e-5
    )


def test_barlowtwins_projector_is_the_authors() -> None:
    """Linear-BN-ReLU x2, then Linear without bias and the loss's BatchNorm without affine, BNs over the global
    batch."""
    task, _ = make_task_and_batch("barlowtwins-tiny-test")
    projector = task.objectives["barlowtwins"].projector
    block = ["Linear", "GlobalBatchNorm1d", "ReLU"]
    assert [type(m).__name__ for m in projector] == [*block, *block, "Linear", "GlobalBatchNorm1d"]
    assert projector[-2].bias is None and not projector[-1].affine
    full = build_config("barlowtwins-vit-s16").objectives.barlowtwins
    assert full is not None and (full.hidden_dim, full.out_dim, full.lambd) == (8192, 8192, 5e-3)


def test_barlowtwins_gradients_reach_projector_and_tower() -> None:
    task, batch = make_task_and_batch("barlowtwins-tiny-test")
    reached = grads_of(task, "barlowtwins", batch)
    assert {"student.visual", "objectives.barlowtwins"} <= prefixes(reached)


@pytest.mark.slow
def test_barlowtwins_two_ranks_times_b_equal_one_rank_times_2b(
    two_ranks: TwoRanks, one_rank: Callable[..., Path]
) -> None:
    """Checks the cross-correlation summed over ranks, the global-batch BatchNorms and their gradients together:
    any of them wrong changes the losses of steps 1..3."""
    one = records(one_rank(*three_steps("barlowtwins")))
    two = records(two_ranks.folder("barlowtwins") / "run")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_barlowtwins", "barlowtwins_off_diag"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.parametrize(("key", "message"), [("out_dim", "must be positive, got 0"), ("lambd", "must be positive")])
def test_barlowtwins_sizes_and_lambda_must_be_positive(key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"'objectives.barlowtwins.{key}' {message}") as error:
        build_config("barlowtwins-tiny-test", [f"objectives.barlowtwins.{key}=0"])
    assert "\n" not in str(error.value)
