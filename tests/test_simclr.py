"""SimCLR as an image-only method (`simclr` preset): the paper's projector and temperature, no text tower and no
teacher, NT-Xent against the paper's Algorithm 1, and the contrast over the global batch on two ranks (its run and
benchmark: tests/test_method_smoke.py; SLIP's use of the same loss: tests/test_losses.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harmony.config import ConfigError
from harmony.core.distributed import gather_with_grad
from harmony.models.normalize import normalize
from harmony.objectives.base import StepInfo
from harmony.objectives.simclr import simclr_loss
from harmony.presets import build_config
from tests.conftest import TwoRanks
from tests.test_gradients import grads_of, make_task_and_batch, prefixes


def paper_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, tau: float) -> torch.Tensor:
    """Algorithm 1 of the SimCLR paper, written from it: z_{2k-1}, z_{2k} the two views of sample k;
    s_ij = cos(z_i, z_j); l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau);
    L = 1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    n = z_a.shape[0]
    z = torch.stack([z_a, z_b], dim=1).reshape(2 * n, -1)  # rows 2k, 2k+1 (0-based) are sample k's views
    s = [[float(F.cosine_similarity(z[i], z[j], dim=0)) for j in range(2 * n)] for i in range(2 * n)]

    def pair_loss(i: int, j: int) -> float:
        return -math.log(math.exp(s[i][j] / tau) / sum(math.exp(s[i][k] / tau) for k in range(2 * n) if k != i))

    return torch.tensor(sum(pair_loss(2 * k, 2 * k + 1) + pair_loss(2 * k + 1, 2 * k) for k in range(n)) / (2 * n))


def test_simclr_loss_is_the_papers_nt_xent() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(6, 5, generator=gen), dim=1) for _ in range(2))
    torch.testing.assert_close(simclr_loss(a, b, a, b, 0.1, offset=0), paper_nt_xent(a, b, 0.1))
    torch.testing.assert_close(simclr_loss(a, b, a, b, 0.5, offset=0), paper_nt_xent(a, b, 0.5))


def test_the_simclr_preset_is_image_only_with_the_papers_projector() -> None:
    """Two linear layers (Linear-BN-ReLU-Linear) to 128 dimensions, tau 0.1; no text tower, no teacher."""
    task, batch = make_task_and_batch("simclr-tiny-test", batch_size=8)
    assert task.student.text is None and task.teacher is None and "text" not in batch
    assert list(task.objectives) == ["simclr"]
    cfg = task.cfg.objectives.simclr
    assert (cfg.num_layers, cfg.out_dim, cfg.temperature) == (2, 128, 0.1)
    projector = task.objectives["simclr"].projector.net
    assert [type(m).__name__ for m in projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert projector[-1].out_features == 128
    slip = make_task_and_batch("slip-tiny-test")[0].objectives["simclr"].projector.net
    assert [type(m).__name__ for m in slip] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]  # SLIP's three


def test_simclr_objective_is_the_papers_loss_on_the_students_crops() -> None:
    task, batch = make_task_and_batch("simclr-tiny-test", batch_size=8)
    objective = task.objectives["simclr"]
    loss = objective(task.encode(batch), batch, StepInfo(0, 8)).loss
    images = normalize(batch["global"])
    with torch.no_grad():
        cls = torch.cat([task.student.visual(images[g])[:, 0] for g in (0, 1)])
        z = F.normalize(torch.cat([objective.projector(cls[:8]), objective.projector(cls[8:])]), dim=1)
    torch.testing.assert_close(loss, paper_nt_xent(z[:8], z[8:], 0.1), rtol=1e-4, atol=1e-5)
    reached = prefixes(grads_of(task, "simclr", batch))
    assert reached == {"student.visual", "objectives.simclr"}


def _shared_views() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randn(8, 5, generator=gen, dtype=torch.float64)


def _contrast(a: torch.Tensor, b: torch.Tensor, offset: int) -> dict[str, torch.Tensor]:
    """NT-Xent of these rows against the gathered rows of every rank; the loss and the inputs' gradients."""
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    q_a, q_b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    loss = simclr_loss(q_a, q_b, gather_with_grad(q_a), gather_with_grad(q_b), 0.1, offset)
    loss.backward()
    assert a.grad is not None and b.grad is not None
    return {"loss": loss.detach(), "a_grad": a.grad, "b_grad": b.grad}


def contrast_this_ranks_rows(rank: int, out: Path) -> None:
    """Rank `rank` of 2 (run by tests/two_ranks.py) contrasts rows 4r..4r+3 of the shared views against the
    gathered rows of both ranks. Written to `out/rank<r>.pt`."""
    a, b = _shared_views()
    rows = slice(4 * rank, 4 * rank + 4)
    torch.save(_contrast(a[rows], b[rows], offset=4 * rank), out / f"rank{rank}.pt")
    dist.barrier()


@pytest.mark.slow
def test_two_ranks_contrast_over_the_global_batch_as_one_rank(two_ranks: TwoRanks) -> None:
    """The mean of the ranks' losses is the whole batch's loss, and each rank's row gradients (summed over ranks
    by the gather's backward) are the whole batch's times the 2 ranks DDP averages over."""
    folder = two_ranks.folder("simclr_global_batch")
    whole = _contrast(*_shared_views(), offset=0)
    ranks = [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole["loss"])
    for key in ("a_grad", "b_grad"):
        torch.testing.assert_close(torch.cat([ranks[0][key], ranks[1][key]]) / 2, whole[key])


@pytest.mark.slow
def test_two_ranks_train_simclr_as_one_rank_with_the_whole_batch(
    two_ranks: TwoRanks, one_rank: Callable[..., Path]
) -> None:
    """2 gloo ranks x 4 images train as 1 x 8: the projector's plain BatchNorm layers normalise over the global
    batch (converted with several processes on any device), and the contrast reads the gathered rows."""
    from tests.two_ranks import SIMCLR_RUN

    two, one = two_ranks.folder("simclr") / "run", one_rank(*SIMCLR_RUN)

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line]

    assert len(losses(one)) == 3
    assert losses(two) == pytest.approx(losses(one), rel=1e-4, abs=1e-5)


def test_simclr_num_layers_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"'objectives.simclr.num_layers' must be positive") as err:
        build_config("simclr-tiny-test", ["objectives.simclr.num_layers=0"])
    assert "\n" not in str(err.value)
