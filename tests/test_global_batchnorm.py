"""GlobalBatchNorm1d: nn.BatchNorm1d at world size 1; the statistics of the global batch across gloo ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from harmony.models.global_batchnorm import GlobalBatchNorm1d
from harmony.models.heads import batchnorm_mlp
from tests.conftest import TwoRanks


def direct_batch_norm(x: torch.Tensor, norm: GlobalBatchNorm1d) -> torch.Tensor:
    """Training-mode BN written out: biased batch variance, learnt scale and shift when affine."""
    mean = x.mean(dim=0)
    var = ((x - mean) ** 2).mean(dim=0)
    y = (x - mean) / torch.sqrt(var + norm.eps)
    return y * norm.weight + norm.bias if norm.affine else y


def direct_batchnorm_mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A `batchnorm_mlp` in training mode, layer by layer from its weights (Linear-BN-ReLU blocks, then the
    output Linear and its optional BN), to check a head against."""
    layers = list(mlp)
    while len(layers) > 2:
        linear, norm, relu = layers[:3]
        assert isinstance(linear, nn.Linear) and isinstance(norm, GlobalBatchNorm1d) and isinstance(relu, nn.ReLU)
        x = torch.relu(direct_batch_norm(x @ linear.weight.t(), norm))
        layers = layers[3:]
    last = layers[0]
    assert isinstance(last, nn.Linear)
    x = x @ last.weight.t() + (last.bias if last.bias is not None else 0.0)
    if len(layers) == 2:
        assert isinstance(layers[1], GlobalBatchNorm1d)
        x = direct_batch_norm(x, layers[1])
    return x


@pytest.mark.parametrize("affine", [True, False])
def test_one_rank_equals_torch_batchnorm_in_train_and_eval_mode(affine: bool) -> None:
    torch.manual_seed(0)
    ours, reference = GlobalBatchNorm1d(6, affine=affine), nn.BatchNorm1d(6, affine=affine)
    if affine:
        with torch.no_grad():
            for module in (ours, reference):
                module.weight.copy_(torch.linspace(0.5, 2.0, 6))
                module.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    for step in range(3):
        x = (torch.randn(10, 6) * 3 + step).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        out, out_ref = ours(x), reference(x_ref)
        torch.testing.assert_close(out, out_ref)
        weights = torch.randn(10, 6)
        (out * weights).sum().backward()
        (out_ref * weights).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        if affine:
            torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
            torch.testing.assert_close(ours.bias.grad, reference.bias.grad)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked) == 3
    ours.eval(), reference.eval()
    x = torch.randn(4, 6)
    torch.testing.assert_close(ours(x), reference(x))
    assert ours.state_dict().keys() == reference.state_dict().keys()  # checkpoints interchange


def test_one_row_in_training_mode_is_refused_as_torch_does() -> None:
    with pytest.raises(ValueError, match="more than one row"):
        GlobalBatchNorm1d(3)(torch.randn(1, 3))
    GlobalBatchNorm1d(3).eval()(torch.randn(1, 3))  # eval mode reads the running statistics


def test_batchnorm_mlp_layouts() -> None:
    head = batchnorm_mlp(8, 16, 4, num_layers=3, output_norm="plain")
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "ReLU"] * 2 + ["Linear", "GlobalBatchNorm1d"]
    assert head[-1].weight is None and all(m.bias is None for m in head if isinstance(m, nn.Linear))
    predictor = batchnorm_mlp(4, 2, 4, num_layers=2, output_norm="none")
    assert [type(m).__name__ for m in predictor] == ["Linear", "GlobalBatchNorm1d", "ReLU", "Linear"]
    assert predictor[-1].bias is not None  # no BN after it to absorb a bias
    x = torch.randn(5, 8)
    torch.testing.assert_close(head(x), direct_batchnorm_mlp(head, x))


def _shared_problem() -> tuple[torch.Tensor, torch.Tensor, GlobalBatchNorm1d]:
    gen = torch.Generator().manual_seed(1)
    x, weights = torch.randn(8, 5, generator=gen) * 2 + 1, torch.randn(8, 5, generator=gen)
    norm = GlobalBatchNorm1d(5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 5))  # type: ignore[union-attr]
    return x, weights, norm


def _normalise(norm: GlobalBatchNorm1d, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient and weight gradient of sum(weights * norm(x)), and the running statistics."""
    x = x.clone().requires_grad_(True)
    out = norm(x)
    (out * weights).sum().backward()
    assert norm.weight is not None and norm.weight.grad is not None and x.grad is not None
    return {
        "out": out.detach(),
        "input_grad": x.grad,
        "weight_grad": norm.weight.grad.clone(),
        "running_mean": norm.running_mean.clone(),
        "running_var": norm.running_var.clone(),
    }


def normalise_this_ranks_rows(rank: int, out: Path) -> None:
    """Rank `rank` of 2 (run by tests/two_ranks.py) normalises rows 4r..4r+3 of the shared batch; the weight
    gradient is summed over ranks (DDP's average times the world size, what one rank's whole-batch loss
    gives). Written to `out/rank<r>.pt`."""
    x, weights, norm = _shared_problem()
    rows = slice(4 * rank, 4 * rank + 4)
    result = _normalise(norm, x[rows], weights[rows])
    dist.all_reduce(result["weight_grad"])
    torch.save(result, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_normalise_and_backpropagate_as_one_rank_with_the_whole_batch(two_ranks: TwoRanks) -> None:
    folder = two_ranks.folder("global_batchnorm")
    x, weights, norm = _shared_problem()
    whole = _normalise(norm, x, weights)
    ranks = [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]
    for key in ("out", "input_grad"):
        torch.testing.assert_close(torch.cat([ranks[0][key], ranks[1][key]]), whole[key])
    for key in ("weight_grad", "running_mean", "running_var"):
        for part in ranks:
            torch.testing.assert_close(part[key], whole[key])
    local_only = _normalise(_shared_problem()[2], x[:4], weights[:4])["out"]  # rank 0's statistics alone differ
    assert not torch.allclose(local_only, whole["out"][:4], atol=1e-3)
