"""VICReg: the terms against a direct computation, the paper's pseudocode and the authors' code, the objective on
the towers, its expander, gradients, 2 ranks == 1 (its run and benchmark: tests/test_method_smoke.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harmony.config import ConfigError
from harmony.models.normalize import normalize
from harmony.objective_config import VICRegConfig
from harmony.objectives.base import StepInfo
from harmony.objectives.vicreg import vicreg_loss, vicreg_terms
from harmony.presets import build_config
from tests.conftest import TwoRanks
from tests.test_distributed import records
from tests.test_global_batchnorm import direct_batchnorm_mlp
from tests.test_gradients import grads_of, make_task_and_batch, prefixes
from tests.two_ranks import three_steps


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def paper_pseudocode(z_a: torch.Tensor, z_b: torch.Tensor, lam: float, mu: float, nu: float) -> torch.Tensor:
    """Algorithm 1 of the paper, line by line: the variance terms of the two branches are summed."""
    n, d = z_a.shape
    sim_loss = F.mse_loss(z_a, z_b)
    std_z_a = torch.sqrt(z_a.var(dim=0) + 1e-04)
    std_z_b = torch.sqrt(z_b.var(dim=0) + 1e-04)
    std_loss = torch.mean(F.relu(1 - std_z_a)) + torch.mean(F.relu(1 - std_z_b))
    z_a = z_a - z_a.mean(dim=0)
    z_b = z_b - z_b.mean(dim=0)
    cov_z_a = (z_a.T @ z_a) / (n - 1)
    cov_z_b = (z_b.T @ z_b) / (n - 1)
    cov_loss = off_diagonal(cov_z_a).pow(2).sum() / d + off_diagonal(cov_z_b).pow(2).sum() / d
    return lam * sim_loss + mu * std_loss + nu * cov_loss


def authors_code(x: torch.Tensor, y: torch.Tensor, sim: float, std: float, cov: float) -> torch.Tensor:
    """The released training code's loss (one process): the variance terms of the two branches are averaged."""
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = off_diagonal(cov_x).pow(2).sum().div(d) + off_diagonal(cov_y).pow(2).sum().div(d)
    return sim * repr_loss + std * std_loss + cov * cov_loss


def direct_terms(z_a: torch.Tensor, z_b: torch.Tensor) -> tuple[float, float, float]:
    """(invariance, variance, covariance) entry by entry (gamma 1, eps 1e-4, unbiased statistics)."""
    n, d = z_a.shape
    a, b = z_a.tolist(), z_b.tolist()
    invariance = sum((a[i][k] - b[i][k]) ** 2 for i in range(n) for k in range(d)) / (n * d)

    def stats(z: list[list[float]]) -> tuple[float, float]:
        mean = [sum(z[i][k] for i in range(n)) / n for k in range(d)]
        cov = [[sum((z[i][p] - mean[p]) * (z[i][q] - mean[q]) for i in range(n)) / (n - 1) for q in range(d)]
               for p in range(d)]  # fmt: skip
        hinge = sum(max(0.0, 1.0 - math.sqrt(cov[k][k] + 1e-4)) for k in range(d)) / d
        off = sum(cov[p][q] ** 2 for p in range(d) for q in range(d) if p != q) / d
        return hinge, off

    (var_a, cov_a), (var_b, cov_b) = stats(a), stats(b)
    return invariance, 0.5 * (var_a + var_b), cov_a + cov_b


def test_the_terms_are_a_direct_computation_and_the_loss_the_authors_code() -> None:
    gen = torch.Generator().manual_seed(0)
    z_a, z_b = 0.5 * torch.randn(7, 5, generator=gen), 0.5 * torch.randn(7, 5, generator=gen)  # std below 1
    cfg = VICRegConfig()
    terms = vicreg_terms(z_a, z_b, z_a, z_b, cfg)
    for got, want in zip(terms.values(), direct_terms(z_a, z_b), strict=True):
        assert got.item() == pytest.approx(want, rel=1e-5)
    assert terms["variance"].item() > 0
    loss = vicreg_loss(terms, cfg)
    torch.testing.assert_close(loss, authors_code(z_a, z_b, 25.0, 25.0, 1.0))
    # the paper's pseudocode sums the two variance terms where the code averages them: mu / 2 there
    torch.testing.assert_close(loss, paper_pseudocode(z_a, z_b, 25.0, 12.5, 1.0))


def test_vicreg_objective_matches_the_authors_code_on_the_towers() -> None:
    task, batch = make_task_and_batch("vicreg-tiny-test", batch_size=6)
    objective = task.objectives["vicreg"]
    assert task.teacher is None and task.student.text is None
    cfg = task.cfg.objectives.vicreg
    assert (cfg.invariance_weight, cfg.variance_weight, cfg.covariance_weight) == (25.0, 25.0, 1.0)
    out = objective(task.encode(batch), batch, StepInfo(0, 8))
    images = normalize(batch["global"])
    with torch.no_grad():
        z = [direct_batchnorm_mlp(objective.expander, task.student.visual(images[g])[:, 0]) for g in (0, 1)]
    torch.testing.assert_close(out.loss, authors_code(z[0], z[1], 25.0, 25.0, 1.0), rtol=1e-4, atol=1e-5)
    for key, want in zip(("invariance", "variance", "covariance"), direct_terms(z[0], z[1]), strict=True):
        assert out.metrics[f"vicreg_{key}"].item() == pytest.approx(want, rel=1e-4), key


def test_vicreg_expander_is_the_authors() -> None:
    """Linear-BN-ReLU x2, then a Linear without bias; the BNs over the global batch; 8192-8192-8192 at full size."""
    task, _ = make_task_and_batch("vicreg-tiny-test")
    expander = task.objectives["vicreg"].expander
    block = ["Linear", "GlobalBatchNorm1d", "ReLU"]
    assert [type(m).__name__ for m in expander] == [*block, *block, "Linear"]
    assert expander[-1].bias is None
    full = build_config("vicreg-vit-b16").objectives.vicreg
    assert full is not None and (full.hidden_dim, full.out_dim, full.epsilon) == (8192, 8192, 1e-4)


def test_vicreg_gradients_reach_expander_and_tower() -> None:
    task, batch = make_task_and_batch("vicreg-tiny-test")
    assert {"student.visual", "objectives.vicreg"} <= prefixes(grads_of(task, "vicreg", batch))


@pytest.mark.slow
def test_vicreg_two_ranks_times_b_equal_one_rank_times_2b(two_ranks: TwoRanks, one_rank: Callable[..., Path]) -> None:
    """Checks the statistics over the gathered embeddings (and the gather's gradient), the local invariance term
    and the global-batch BatchNorms together: any of them wrong changes the losses of steps 1..3."""
    one = records(one_rank(*three_steps("vicreg")))
    two = records(two_ranks.folder("vicreg") / "run")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_vicreg", "vicreg_invariance", "vicreg_variance", "vicreg_covariance"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.parametrize(("key", "message"), [("out_dim", "must be positive, got 0"), ("epsilon", "must be positive")])
def test_vicreg_sizes_and_epsilon_must_be_positive(key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"'objectives.vicreg.{key}' {message}") as error:
        build_config("vicreg-tiny-test", [f"objectives.vicreg.{key}=0"])
    assert "\n" not in str(error.value)
