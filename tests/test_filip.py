"""FILIP: the token-wise similarities against the paper's equations, padding excluded, the objective on the towers
and their projections, the excluded FLIP, gradients, 2 ranks == 1 (its run and benchmark:
tests/test_method_smoke.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harmony.config import ConfigError
from harmony.models.normalize import normalize
from harmony.objectives.base import StepInfo
from harmony.objectives.filip import late_interaction
from harmony.presets import build_config
from tests.conftest import TwoRanks
from tests.test_accumulation import train
from tests.test_distributed import records
from tests.test_gradients import grads_of, make_task_and_batch, prefixes
from tests.two_ranks import FILIP_RUN


def paper_similarities(image: torch.Tensor, text: torch.Tensor, real: torch.Tensor) -> tuple[list[list[float]], ...]:
    """The paper's token-wise similarities, one pair at a time: for image i and caption j with n1 patches and n2
    real tokens, m_k = argmax_r x_k . y_r and s_i2t = 1/n1 sum_k x_k . y_{m_k}; s_t2i symmetrically over j's
    tokens."""
    i2t = [[0.0] * text.shape[0] for _ in range(image.shape[0])]
    t2i = [[0.0] * text.shape[0] for _ in range(image.shape[0])]
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            x = image[i]
            y = text[j][real[j]]  # the caption's own tokens only
            dots = [[float(x[k] @ y[r]) for r in range(y.shape[0])] for k in range(x.shape[0])]
            i2t[i][j] = sum(row[max(range(len(row)), key=row.__getitem__)] for row in dots) / x.shape[0]
            t2i[i][j] = sum(max(dots[k][r] for k in range(x.shape[0])) for r in range(y.shape[0])) / y.shape[0]
    return i2t, t2i


def direct_contrast(i2t: list[list[float]], t2i: list[list[float]], scale: float) -> float:
    """1/2 [CE(I, softmax(s S_i2t)) + CE(I, softmax(s S_t2i^T))], averaged over rows, written out."""
    n = len(i2t)

    def ce(rows: list[list[float]]) -> float:
        return sum(math.log(sum(math.exp(scale * v) for v in row)) - scale * row[i] for i, row in enumerate(rows)) / n

    return 0.5 * (ce(i2t) + ce([[t2i[i][j] for i in range(n)] for j in range(n)]))


def test_late_interaction_is_the_papers_and_excludes_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(3, 5, 4, generator=gen), dim=-1)
    text = F.normalize(torch.randn(4, 6, 4, generator=gen), dim=-1)
    real = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [True] * 2 + [False] * 4, [True] * 5 + [False]])
    i2t, t2i = late_interaction(image, text, real)
    want_i2t, want_t2i = paper_similarities(image, text, real)
    torch.testing.assert_close(i2t, torch.tensor(want_i2t))
    torch.testing.assert_close(t2i, torch.tensor(want_t2i))
    padding_changed = text.clone()
    padding_changed[~real] = 10.0  # anything at the padding: nothing changes
    for got, want in zip(late_interaction(image, padding_changed, real), (i2t, t2i), strict=True):
        torch.testing.assert_close(got, want)
    padded = F.pad(text, (0, 0, 0, 3)), F.pad(real, (0, 3), value=False)  # more padding: nothing changes
    for got, want in zip(late_interaction(image, *padded), (i2t, t2i), strict=True):
        torch.testing.assert_close(got, want)


def test_filip_objective_matches_the_paper_on_the_towers() -> None:
    """Crop 0's patch tokens and the caption's tokens through the model's projections, normalised; the paper's
    similarities at the model's scale; padded to the context length, the same loss."""
    task, batch = make_task_and_batch("filip-tiny-test", 5, ("model.context_length=40",))
    objective = task.objectives["filip"]
    enc = task.encode(batch)
    loss = objective(enc, batch, StepInfo(0, 8)).loss
    student = task.student
    with torch.no_grad():
        patches = student.visual(normalize(batch["global"])[0])[:, 1:]
        image = F.normalize(patches @ student.visual_projection.weight.t(), dim=-1)
        text = F.normalize(student.text(batch["text"]) @ student.text_projection, dim=-1)
    i2t, t2i = paper_similarities(image, text, batch["text_real"])
    scale = float(student.scale().detach())
    assert scale == pytest.approx(1 / 0.07)
    assert loss.item() == pytest.approx(direct_contrast(i2t, t2i, scale), rel=1e-4)
    context = 40 - batch["text"].shape[1]
    assert context > 0
    padded = dict(batch, text=F.pad(batch["text"], (0, context)), text_real=F.pad(batch["text_real"], (0, context)))
    torch.testing.assert_close(objective(task.encode(padded), padded, StepInfo(0, 8)).loss, loss)


def test_filip_shares_the_models_scale_and_is_not_combined_with_flip() -> None:
    with pytest.raises(ConfigError, match=r"'objectives\.filip' and 'objectives\.flip' cannot be combined") as error:
        build_config("filip-tiny-test", ["objectives.flip.weight=1"])
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="logit scale"):
        build_config("filip-tiny-test", ["objectives.clip.weight=1", "objectives.clip.logit_scale_init=10"])
    build_config("filip-tiny-test", ["objectives.clip.weight=1"])  # with CLIP: one scale, one init


def test_filip_gradients_reach_both_towers_their_projections_and_the_scale() -> None:
    task, batch = make_task_and_batch("filip-tiny-test")
    expected = {"student.visual", "student.text", "student.visual_projection", "student.text_projection"}
    assert expected | {"student.logit_scale"} <= prefixes(grads_of(task, "filip", batch))


@pytest.mark.slow
def test_filip_two_ranks_times_b_equal_one_rank_times_2b(two_ranks: TwoRanks, one_rank: Callable[..., Path]) -> None:
    """Checks the gathered tokens (each rank's captions padded to the longest of both), their gradients and the
    offsets of the positives together: any of them wrong changes the losses of steps 1..3."""
    one = records(one_rank(*FILIP_RUN))
    two = records(two_ranks.folder("filip") / "run")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_filip", "logit_scale"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_filip_with_a_locked_image_tower_accumulates_exactly() -> None:
    """LiT with FILIP: the frozen tower's patch tokens are cached once, the projections still train; K = 2 == K = 1."""
    reference, ref_state = train("filip-tiny-test", 1, 3, "model.freeze=image")
    rows, state = train("filip-tiny-test", 2, 3, "model.freeze=image")
    for want, got in zip(reference, rows, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    for key in ("student.visual_projection.weight", "student.text_projection", "student.logit_scale"):
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=2e-5)
