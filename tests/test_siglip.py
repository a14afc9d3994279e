"""SigLIP through the registry: the sigmoid formula, the per-rank normalisation, the towers, 2 ranks == 1 (its run
and benchmark: tests/test_method_smoke.py)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harmony.config import ConfigError
from harmony.models.normalize import normalize
from harmony.objectives.base import StepInfo
from harmony.objectives.siglip import siglip_loss, sigmoid_logits
from harmony.presets import build_config
from tests.conftest import TwoRanks
from tests.test_distributed import records
from tests.test_gradients import grads_of, make_task_and_batch
from tests.two_ranks import SIGLIP_RUN


def direct_siglip(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """The paper's formula as a double loop over the pairs of the whole batch."""
    total = torch.zeros(())
    n = image.shape[0]
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * torch.dot(image[i], text[j]) + bias
            total = total + torch.log(1.0 / (1.0 + torch.exp(-z * logit)))
    return -total / n


def unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def test_siglip_loss_is_the_sigmoid_loss_over_every_pair() -> None:
    image, text = unit_rows(6, 5, 0), unit_rows(6, 5, 1)
    for scale, bias in ((10.0, -10.0), (3.0, 0.5)):
        logits = sigmoid_logits(image, text, torch.tensor(scale), torch.tensor([bias]))
        torch.testing.assert_close(siglip_loss(logits, offset=0), direct_siglip(image, text, scale, bias))
    # perfectly separated pairs cost ~0; swapping the positives costs a lot
    eye = torch.eye(4)
    assert siglip_loss(sigmoid_logits(eye, eye, torch.tensor(50.0), torch.tensor([-25.0])), 0) < 1e-9
    assert siglip_loss(sigmoid_logits(eye, eye.flip(0), torch.tensor(50.0), torch.tensor([-25.0])), 0) > 40


def test_two_ranks_of_local_rows_average_to_the_global_loss_and_its_gradient() -> None:
    """What each of 2 ranks computes (its rows vs all captions, offset by its rank) averaged over the ranks, as
    DDP does, is the global loss as a function of every embedding, the scale and the bias (so the gradients are
    the global loss's too, given that the gather's backward sums over ranks)."""
    image, text = unit_rows(8, 5, 2).requires_grad_(), unit_rows(8, 5, 3).requires_grad_()
    scale, bias = torch.tensor(7.0, requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    inputs = (image, text, scale, bias)
    full = siglip_loss(sigmoid_logits(image, text, scale, bias), offset=0)
    per_rank = [
        siglip_loss(sigmoid_logits(image[r * 4 : (r + 1) * 4], text, scale, bias), offset=r * 4) for r in (0, 1)
    ]
    averaged = (per_rank[0] + per_rank[1]) / 2
    torch.testing.assert_close(averaged, full)
    torch.testing.assert_close(averaged, direct_siglip(image.detach(), text.detach(), 7.0, -4.0))
    for mine, reference in zip(torch.autograd.grad(averaged, inputs), torch.autograd.grad(full, inputs), strict=True):
        torch.testing.assert_close(mine, reference)


def test_siglip_objective_matches_a_direct_computation_on_the_towers() -> None:
    task, batch = make_task_and_batch("siglip-tiny-test")
    objective = task.objectives["siglip"]
    assert task.teacher is None and task.student.text is not None
    torch.testing.assert_close(task.student.logit_scale, torch.tensor([math.log(10.0)]))
    torch.testing.assert_close(objective.logit_bias, torch.tensor([-10.0]))
    with torch.no_grad():  # away from the init, so a swapped or missing scale or bias shows
        task.student.logit_scale.fill_(math.log(4.0))
        objective.logit_bias.fill_(-1.5)
    out = objective(task.encode(batch), batch, StepInfo(0, 8))
    with torch.no_grad():
        image = task.student.encode_image(normalize(batch["global"])[0])
        text = task.student.encode_text(batch["text"])
    torch.testing.assert_close(out.loss, direct_siglip(image, text, 4.0, -1.5))
    torch.testing.assert_close(out.metrics["logit_scale"], torch.tensor(4.0))
    torch.testing.assert_close(out.metrics["logit_bias"], torch.tensor(-1.5))


def test_siglip_init_flags_reach_the_model_and_the_bias() -> None:
    overrides = ("objectives.siglip.logit_scale_init=5", "objectives.siglip.logit_bias_init=-3")
    task, _ = make_task_and_batch("siglip-tiny-test", overrides=overrides)
    torch.testing.assert_close(task.student.logit_scale, torch.tensor([math.log(5.0)]))
    torch.testing.assert_close(task.objectives["siglip"].logit_bias, torch.tensor([-3.0]))


def test_sections_setting_the_one_logit_scale_must_agree_on_it() -> None:
    """CLIP (init 1/0.07) with SigLIP (init 10): the model has one scale, so the first section used to win silently."""
    clash = "'objectives.clip.logit_scale_init' and 'objectives.siglip.logit_scale_init' must match"
    with pytest.raises(ConfigError, match=re.escape(clash)):
        build_config("siglip-tiny-test", ["objectives.clip={}"])
    with pytest.raises(ConfigError, match=re.escape("'objectives.siglip.logit_scale_max' must match")):
        build_config("siglip-tiny-test", ["objectives.clip={logit_scale_init: 10, logit_scale_max: 50}"])
    build_config("siglip-tiny-test", ["objectives.clip={logit_scale_init: 10}"])


def test_siglip_gradients_reach_the_bias_and_the_logit_scale() -> None:
    task, batch = make_task_and_batch("siglip-tiny-test")
    reached = grads_of(task, "siglip", batch)
    assert {"objectives.siglip.logit_bias", "student.logit_scale"} <= reached


@pytest.mark.slow
def test_siglip_two_ranks_times_b_equal_one_rank_times_2b(two_ranks: TwoRanks, one_rank: Callable[..., Path]) -> None:
    """The gather with gradient and the per-rank normalisation: any of them wrong changes steps 2 and 3."""
    a, b = records(one_rank(*SIGLIP_RUN)), records(two_ranks.folder("siglip") / "run")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_siglip", "logit_scale", "logit_bias"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert a[3]["loss"] != pytest.approx(a[1]["loss"], rel=1e-6)  # it trained
