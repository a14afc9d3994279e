"""BYOL, the first objective added through the registry alone: formula, wiring, gradients (its run and
benchmark: tests/test_method_smoke.py)."""

from __future__ import annotations

import torch

from harmony.models.normalize import normalize
from harmony.objectives.base import StepInfo
from harmony.objectives.byol import byol_loss
from tests.test_gradients import grads_of, make_task_and_batch, prefixes


def test_byol_loss_is_the_symmetric_two_minus_two_cosine() -> None:
    gen = torch.Generator().manual_seed(0)
    p_a, p_b, z_a, z_b = (torch.randn(5, 7, generator=gen) for _ in range(4))

    def direct(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cos = (p / p.norm(dim=1, keepdim=True) * (z / z.norm(dim=1, keepdim=True))).sum(dim=1)
        return (2 - 2 * cos).mean()

    torch.testing.assert_close(byol_loss(p_a, p_b, z_a, z_b), direct(p_a, z_b) + direct(p_b, z_a))
    assert byol_loss(z_b, z_a, 3 * z_a, 2 * z_b).item() < 1e-6  # scale-free: aligned -> 0
    torch.testing.assert_close(byol_loss(-z_b, -z_a, z_a, z_b), torch.tensor(8.0))  # opposite -> 4 + 4


def test_byol_objective_matches_a_direct_computation_on_the_towers() -> None:
    """Crop a's prediction (student) against crop b's target (EMA teacher) and vice versa."""
    task, batch = make_task_and_batch("byol-tiny-test")
    objective = task.objectives["byol"]
    assert task.teacher is not None
    with torch.no_grad():  # a teacher that is not (yet) the student's copy, so reading the wrong tower shows
        for param in task.teacher.parameters():
            param.mul_(0.9)
    loss = objective(task.encode(batch), batch, StepInfo(0, 8)).loss
    images = normalize(batch["global"])
    with torch.no_grad():
        student = [task.student.visual(images[g])[:, 0] for g in (0, 1)]
        teacher = [task.teacher.visual(images[g])[:, 0] for g in (0, 1)]
        p = [objective.predictor(objective.projector(s)) for s in student]
        z = [objective.target_projector(t) for t in teacher]

    def term(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * torch.nn.functional.cosine_similarity(p, z, dim=-1)).mean()

    torch.testing.assert_close(loss, term(p[0], z[1]) + term(p[1], z[0]))
    assert task.teacher.text is None and task.student.text is None


def test_byol_gradients_reach_student_projector_and_predictor_never_the_target() -> None:
    task, batch = make_task_and_batch("byol-tiny-test")
    reached = grads_of(task, "byol", batch)
    assert {"student.visual", "objectives.byol"} <= prefixes(reached)
    assert any(n.startswith("objectives.byol.predictor.") for n in reached)
    assert any(n.startswith("objectives.byol.projector.") for n in reached)
    assert not any(n.startswith(("teacher.", "objectives.byol.target_projector.")) for n in reached)
    assert not any(p.requires_grad for p in task.objectives["byol"].target_projector.parameters())


def test_byol_target_projector_follows_the_online_one_by_ema() -> None:
    task, _ = make_task_and_batch("byol-tiny-test")
    objective = task.objectives["byol"]
    with torch.no_grad():
        for p in objective.projector.parameters():
            p.add_(1.0)
    online = [p.detach().clone() for p in objective.projector.parameters()]
    target = [p.detach().clone() for p in objective.target_projector.parameters()]
    task.after_step(momentum=0.25)
    for new, t, o in zip(objective.target_projector.parameters(), target, online, strict=True):
        torch.testing.assert_close(new, 0.25 * t + 0.75 * o)
