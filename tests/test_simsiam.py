"""SimSiam: formula (with its stop-gradient), wiring on the student alone, gradients, config checks (its run
and benchmark: tests/test_method_smoke.py)."""

from __future__ import annotations

import pytest
import torch

from harmony.config import ConfigError
from harmony.models.global_batchnorm import GlobalBatchNorm1d
from harmony.models.normalize import normalize
from harmony.objectives.base import StepInfo
from harmony.objectives.simsiam import simsiam_loss
from harmony.presets import build_config
from tests.test_global_batchnorm import direct_batchnorm_mlp
from tests.test_gradients import grads_of, make_task_and_batch, prefixes


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean_b <p_b / |p_b|, z_b / |z_b|>."""
    return -((p / p.norm(dim=1, keepdim=True)) * (z / z.norm(dim=1, keepdim=True))).sum(dim=1).mean()


def test_simsiam_loss_is_the_symmetric_negative_cosine_with_a_stop_gradient_on_z() -> None:
    gen = torch.Generator().manual_seed(0)
    p_a, p_b, z_a, z_b = (torch.randn(5, 7, generator=gen).requires_grad_(True) for _ in range(4))
    loss = simsiam_loss(p_a, p_b, z_a, z_b)
    torch.testing.assert_close(loss, 0.5 * negative_cosine(p_a, z_b) + 0.5 * negative_cosine(p_b, z_a))
    loss.backward()
    assert z_a.grad is None and z_b.grad is None  # stop-gradient: the projections are targets only
    assert p_a.grad is not None and p_a.grad.abs().sum() > 0 and p_b.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(simsiam_loss(z_b, z_a, 3 * z_a, 2 * z_b), torch.tensor(-1.0))  # aligned: minimum
        torch.testing.assert_close(simsiam_loss(-z_b, -z_a, z_a, z_b), torch.tensor(1.0))  # opposite: maximum


def test_simsiam_heads_are_the_papers() -> None:
    """Projector Linear-BN-ReLU x2, Linear-BN without learnt scale and shift (`affine=False` in the authors' code);
    predictor a bottleneck Linear-BN-ReLU-Linear."""
    task, _ = make_task_and_batch("simsiam-tiny-test")
    objective = task.objectives["simsiam"]
    kinds = [type(m).__name__ for m in objective.projector]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "ReLU"] * 2 + ["Linear", "GlobalBatchNorm1d"]
    assert not objective.projector[-1].affine
    assert objective.projector[-1].weight is None and objective.projector[-1].bias is None
    assert not any(name.startswith("projector.7.") for name, _ in objective.named_parameters())
    assert [type(m).__name__ for m in objective.predictor] == ["Linear", "GlobalBatchNorm1d", "ReLU", "Linear"]
    cfg = task.cfg.objectives.simsiam
    assert objective.predictor[0].weight.shape == (cfg.predictor_hidden_dim, cfg.out_dim)
    assert objective.predictor[-1].weight.shape == (cfg.out_dim, cfg.predictor_hidden_dim)
    assert cfg.predictor_hidden_dim < cfg.out_dim  # the bottleneck
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in objective.modules())


def authors_projector(prev_dim: int, dim: int) -> torch.nn.Sequential:
    """The projector of the SimSiam authors' `builder.py`, written from it: the encoder's fc becomes three
    layers, the last Linear's bias unused (it is followed by BN) and the last BN without scale and shift."""
    return torch.nn.Sequential(
        torch.nn.Linear(prev_dim, prev_dim, bias=False),
        torch.nn.BatchNorm1d(prev_dim),
        torch.nn.ReLU(inplace=True),
        torch.nn.Linear(prev_dim, prev_dim, bias=False),
        torch.nn.BatchNorm1d(prev_dim),
        torch.nn.ReLU(inplace=True),
        torch.nn.Linear(prev_dim, dim, bias=False),
        torch.nn.BatchNorm1d(dim, affine=False),
    )


def test_simsiam_projector_is_the_authors_on_identical_tensors() -> None:
    """The same trained tensors (no learnt scale or shift at the output) and the same outputs, in train mode."""
    task, _ = make_task_and_batch("simsiam-tiny-test", overrides=("objectives.simsiam.hidden_dim=32",))
    ours = task.objectives["simsiam"].projector
    assert task.student.visual.embed_dim == 32  # the authors' hidden width is the encoder's
    theirs = authors_projector(32, task.cfg.objectives.simsiam.out_dim)
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in theirs.parameters()]
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_simsiam_objective_matches_a_direct_computation_on_the_student() -> None:
    """Crop a's prediction against crop b's projection and vice versa, both from the student; no teacher."""
    task, batch = make_task_and_batch("simsiam-tiny-test")
    assert task.teacher is None and task.student.text is None
    objective = task.objectives["simsiam"]
    loss = objective(task.encode(batch), batch, StepInfo(0, 8)).loss
    images = normalize(batch["global"])
    with torch.no_grad():
        cls = [task.student.visual(images[g])[:, 0] for g in (0, 1)]
        z = [direct_batchnorm_mlp(objective.projector, c) for c in cls]
        p = [direct_batchnorm_mlp(objective.predictor, zz) for zz in z]
    expected = 0.5 * negative_cosine(p[0], z[1]) + 0.5 * negative_cosine(p[1], z[0])
    torch.testing.assert_close(loss, expected)
    same_view = 0.5 * negative_cosine(p[0], z[0]) + 0.5 * negative_cosine(p[1], z[1])
    assert not torch.allclose(loss, same_view, atol=1e-4)  # the pairing is visible


def test_simsiam_gradients_reach_the_student_projector_and_predictor() -> None:
    task, batch = make_task_and_batch("simsiam-tiny-test")
    reached = grads_of(task, "simsiam", batch)
    assert {"student.visual", "objectives.simsiam"} <= prefixes(reached)
    assert any(n.startswith("objectives.simsiam.predictor.") for n in reached)
    assert any(n.startswith("objectives.simsiam.projector.") for n in reached)
    assert not any(n.startswith("teacher.") for n, _ in task.named_parameters())  # no EMA tower at all
    assert task.ema_parameter_pairs() == ([], [])


@pytest.mark.parametrize("key", ["hidden_dim", "out_dim", "predictor_hidden_dim"])
def test_simsiam_sizes_must_be_positive(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'objectives.simsiam.{key}' must be positive, got 0") as error:
        build_config("simsiam-tiny-test", [f"objectives.simsiam.{key}=0"])
    assert "\n" not in str(error.value)


def test_global_batchnorm_is_what_the_heads_use() -> None:
    task, _ = make_task_and_batch("simsiam-tiny-test")
    assert sum(isinstance(m, GlobalBatchNorm1d) for m in task.objectives["simsiam"].modules()) == 4
