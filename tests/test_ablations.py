"""The lecture's ablations as settings: DINO without the momentum teacher (`objectives.ibot.teacher=student`), with
MSE in place of the cross-entropy (`loss=mse`) and with a predictor on the student side (`predictor=true`); BYOL's
heads without BatchNorm (`objectives.byol.norm=none`) and with GroupNorm + weight standardisation (`gn_ws`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harmony.config import ConfigError
from harmony.models.heads import StandardizedLinear
from harmony.models.normalize import normalize
from harmony.objectives.base import StepInfo
from harmony.objectives.ibot import ibot_cls_loss, ibot_patch_loss
from harmony.presets import build_config
from tests.test_accumulation import batches, make_stepper, train
from tests.test_gradients import grads_of, make_task_and_batch, prefixes

Tensor = torch.Tensor


def direct_squared_distance_cls(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """mean over (global q, view v != q) of mean_b sum_k (P_qbk - softmax(s_vb / tau)_k)^2, pair by pair."""
    q = F.softmax(student / tau, dim=-1)
    pairs = [
        ((teacher[g] - q[v]) ** 2).sum(dim=-1).mean()
        for g in range(teacher.shape[0])
        for v in range(student.shape[0])
        if v != g
    ]
    return torch.stack(pairs).mean()


def test_the_mse_variant_is_the_squared_distance_between_the_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 3, 7, generator=gen, dtype=torch.float64)  # 2 global + 2 local views, B 3, K 7
    teacher = F.softmax(torch.randn(2, 3, 7, generator=gen, dtype=torch.float64) / 0.04, dim=-1)
    got = ibot_cls_loss(student, teacher, 0.1, mse=True)
    torch.testing.assert_close(got, direct_squared_distance_cls(student, teacher, 0.1).float())
    assert not torch.allclose(got, ibot_cls_loss(student, teacher, 0.1))  # not the cross-entropy
    rows, targets = torch.randn(5, 7, generator=gen), F.softmax(torch.randn(5, 7, generator=gen), dim=-1)
    weights = torch.rand(5, generator=gen)
    direct = (((F.softmax(rows / 0.1, dim=-1) - targets) ** 2).sum(dim=-1) * weights).sum()
    torch.testing.assert_close(ibot_patch_loss(rows, targets, weights, 0.1, mse=True), direct)
    same = F.softmax(student[:2] / 0.1, dim=-1)
    assert ibot_cls_loss(student[:2], same, 0.1, mse=True).item() == pytest.approx(
        direct_squared_distance_cls(student[:2], same, 0.1).item()
    )


def dino_direct(task: nn.Module, batch: dict[str, Tensor], targets_from: nn.Module, mse: bool) -> Tensor:
    """DINO's CLS loss from the modules: student head on the student's CLS of every view, targets of the tower
    `targets_from` on the clean global crops through the teacher head, centred (the centre is 0 before any step)."""
    objective = task.objectives["ibot"]
    cfg = task.cfg.objectives.ibot
    images, local = normalize(batch["global"]), normalize(batch["local"])
    views = [task.student.visual(images[g])[:, 0] for g in (0, 1)]
    views += [task.student.visual(local[v])[:, 0] for v in range(local.shape[0])]
    student = objective.student_logits(torch.stack(views))
    with torch.no_grad():
        t = torch.stack([objective.teacher_head(targets_from(images[g])[:, 0]) for g in (0, 1)])
        probs = F.softmax((t - objective.cls_center.value) / cfg.teacher_temp_cls, dim=-1)
    return ibot_cls_loss(student, probs, cfg.student_temp, mse)


def test_dino_with_mse_trains_on_the_squared_distance() -> None:
    task, batch = make_task_and_batch("dino-tiny-test", overrides=("objectives.ibot.loss=mse",))
    loss = task.objectives["ibot"](task.encode(batch), batch, StepInfo(0, 8)).loss
    assert task.teacher is not None
    torch.testing.assert_close(loss, dino_direct(task, batch, task.teacher.visual, mse=True))
    assert not torch.allclose(loss, dino_direct(task, batch, task.teacher.visual, mse=False))


def test_dino_without_the_momentum_teacher_distils_the_students_current_weights() -> None:
    """No EMA tower or head: after a step the targets are the updated student's own outputs, without gradient."""
    stepper = make_stepper("dino-tiny-test", 1, 8, "objectives.ibot.teacher=student")
    task, objective = stepper.task, stepper.task.objectives["ibot"]
    assert task.teacher is None and objective.teacher_head is objective.student_head
    assert task.ema_parameter_pairs() == ([], [])
    first, second = batches(stepper, 2)
    stepper.train_step(first)
    task.zero_grad(set_to_none=True)
    loss = objective(task.encode(second), second, StepInfo(1, 8)).loss
    loss.backward()
    got = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    task.zero_grad(set_to_none=True)
    direct = dino_direct(task, second, task.student.visual, mse=False)  # targets under no_grad
    torch.testing.assert_close(loss, direct)
    direct.backward()
    want = {n: p.grad for n, p in task.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and {"student.visual", "objectives.ibot"} <= prefixes(set(got))
    for name, grad in want.items():  # the targets carry no gradient
        torch.testing.assert_close(got[name], grad, msg=name)


def test_dino_with_a_predictor_on_the_student_side_trains_it() -> None:
    task, batch = make_task_and_batch("dino-tiny-test", overrides=("objectives.ibot.predictor=true",))
    objective = task.objectives["ibot"]
    assert objective.predictor is not None
    step = StepInfo(0, 8)
    before = objective(task.encode(batch), batch, step)
    torch.testing.assert_close(before.loss, dino_direct(task, batch, task.teacher.visual, mse=False))
    with torch.no_grad():
        for param in objective.predictor.parameters():
            param.add_(0.1)
    after = objective(task.encode(batch), batch, step)
    assert not torch.allclose(after.loss, before.loss)  # the student's path goes through it ...
    torch.testing.assert_close(  # ... the teacher's does not
        after.metrics["ibot_cls_target_entropy"], before.metrics["ibot_cls_target_entropy"]
    )
    reached = grads_of(task, "ibot", batch)
    assert any(n.startswith("objectives.ibot.predictor.") for n in reached)
    assert not any(n.startswith(("teacher.", "objectives.ibot.teacher_head.")) for n in reached)
    stepper = make_stepper("dino-tiny-test", 1, 8, "objectives.ibot.predictor=true")
    predictor = stepper.task.objectives["ibot"].predictor
    start = [p.detach().clone() for p in predictor.parameters()]
    for batch in batches(stepper, 2):  # the first step's learning rate is 0 (warm-up)
        stepper.train_step(batch)
    assert all(not torch.equal(p, s) for p, s in zip(predictor.parameters(), start))
    assert "predictor" not in {n.split(".")[2] for n, _ in stepper.task.named_parameters() if "teacher" in n}


def test_weight_standardisation_is_mean_zero_variance_one_per_output() -> None:
    layer = StandardizedLinear(6, 4)
    x = torch.randn(3, 6)
    w = layer.weight
    standard = (w - w.mean(dim=1, keepdim=True)) / torch.sqrt(w.var(dim=1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer(x), x @ standard.t() + layer.bias)


@pytest.mark.parametrize(
    ("norm", "kinds"),
    [
        ("bn", ["Linear", "BatchNorm1d", "ReLU", "Linear"]),
        ("none", ["Linear", "ReLU", "Linear"]),
        ("gn_ws", ["StandardizedLinear", "GroupNorm", "ReLU", "Linear"]),
    ],
)
def test_byol_heads_with_each_normalisation_train(norm: str, kinds: list[str]) -> None:
    stepper = make_stepper("byol-tiny-test", 1, 8, f"objectives.byol.norm={norm}")
    objective = stepper.task.objectives["byol"]
    for head in (objective.projector, objective.predictor, objective.target_projector):
        assert [type(m).__name__ for m in head] == kinds
    if norm == "gn_ws":
        assert objective.projector[1].num_groups == 16
    for batch in batches(stepper, 2):
        assert torch.isfinite(stepper.train_step(batch)["loss_byol"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objectives.ibot.teacher=momentum", "'objectives.ibot.teacher' expects one of 'ema', 'student'"),
        ("objectives.ibot.loss=l1", "'objectives.ibot.loss' expects one of 'cross_entropy', 'mse'"),
        ("objectives.ibot.predictor=maybe", "'objectives.ibot.predictor'"),
        ("objectives.byol.norm=ln", "'objectives.byol.norm' expects one of 'bn', 'none', 'gn_ws'"),
        ("objectives.byol.hidden_dim=60", "'objectives.byol.hidden_dim' must be a multiple of 16 with norm gn_ws"),
    ],
)
def test_a_bad_ablation_setting_is_one_line(override: str, message: str) -> None:
    preset = "byol-tiny-test" if "byol" in override else "dino-tiny-test"
    extra = ["objectives.byol.norm=gn_ws"] if "hidden_dim" in override else []
    with pytest.raises(ConfigError, match=message) as err:
        build_config(preset, [*extra, override])
    assert "\n" not in str(err.value)
    assert build_config("byol-tiny-test", ["objectives.byol.norm=none"]).objectives.byol.norm == "none"


def test_the_dino_ablations_accumulate_like_the_whole_batch() -> None:
    """Teacher = student, MSE and the predictor together: K = 2 micro-batches give the K = 1 losses and weights."""
    settings = ("objectives.ibot.teacher=student", "objectives.ibot.loss=mse", "objectives.ibot.predictor=true")
    reference, ref_state = train("dino-tiny-test", 1, 2, *settings)
    rows, state = train("dino-tiny-test", 2, 2, *settings)
    for want, got in zip(reference, rows, strict=True):
        assert got["loss_ibot"] == pytest.approx(want["loss_ibot"], rel=1e-5, abs=1e-6)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=2e-5, msg=key)
