"""Fidelity to the code behind the paper's numbers: one test per row of docs/fidelity.md (caption padding, the
logit-scale clamp, gradient clipping, text-distillation averaging, the MAE crop sum, stochastic depth)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harmony.core.distributed import DistInfo
from harmony.data.views import ViewMaker, collate
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer
from harmony.objectives.base import Encoded, StepInfo
from harmony.objectives.mae import mae_loss
from harmony.objectives.mlm import MLMObjective
from harmony.objectives.text_distill import TextDistillObjective
from harmony.train.optim import clip_gradients
from harmony.train.step import Stepper
from harmony.typed import ConfigError
from tests.conftest import Cli, TwoRanks, tiny

TOK = CaptionTokenizer(context_length=12)


# -- 1. padding comes from the end-of-text position, never from id 0 (a bare "!") -------------------


def test_exclamation_mark_is_a_word_not_padding() -> None:
    ids = TOK("wow !$ red")[0]
    bang = 2
    assert ids[bang].item() == 0  # the BPE id of a bare "!" is the padding fill value
    assert TOK.word_positions(ids)[bang] and TOK.real_positions(ids)[bang]
    assert TOK.real_positions(ids).sum().item() == 6 and not TOK.real_positions(ids)[6:].any()
    assert TOK.decode(ids) == "wow !$ red"
    sample = {"text": ids, "text_real": TOK.real_positions(ids), "text_mask": torch.zeros(12, dtype=torch.bool)}
    sample["text_masked"] = ids
    batch = collate([sample])
    assert bang in batch["text_real_index"].tolist()  # the text-distillation centre sees it


def test_mlm_decoder_attends_to_an_exclamation_mark() -> None:
    """The decoder's padding mask comes from end-of-text: changing the features at the "!" position
    changes the prediction at another position (under id-based padding it was ignored)."""
    cfg = tiny("harmony-tiny-test").objectives.mlm
    assert cfg is not None
    torch.manual_seed(0)
    mlm = MLMObjective(cfg, text_width=32, vocab_size=TOK.vocab_size)
    ids = TOK(["wow !$ red", "a blue star"])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 1] = True
    samples = [
        {"text": ids[i], "text_real": TOK.real_positions(ids[i]), "text_mask": mask[i], "text_masked": ids[i]}
        for i in range(2)
    ]
    batch = collate(samples, trim=False)  # keep the padding, which the decoder must ignore
    features = torch.randn(2, 12, 32)
    step = StepInfo(0, 1)
    before = mlm(Encoded(text_masked=features), batch, step).loss
    features[0, 2] = torch.randn(32)  # the "!" token of caption 0 (not itself scored)
    after = mlm(Encoded(text_masked=features), batch, step).loss
    assert not torch.isclose(before, after)
    features[0, 8] = torch.randn(32)  # real padding (after end-of-text) is still ignored
    assert torch.isclose(after, mlm(Encoded(text_masked=features), batch, step).loss)


# -- 2. the logit scale is clamped in place after the step, not in the forward pass -----------------


def test_logit_scale_gradient_is_non_zero_at_the_cap() -> None:
    model = ImageTextModel("tiny-test", "tiny-test", 16, 32, TOK.vocab_size, 12, TOK.eot_id, logit_scale_init=100.0)
    model.scale().backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.item() == pytest.approx(100.0, rel=1e-5)


def clip_stepper(*overrides: str) -> tuple[Stepper, dict[str, torch.Tensor]]:
    cfg = tiny("clip-tiny-test", "train.device=cpu", "train.precision=fp32", *overrides)
    stepper = Stepper(cfg, torch.device("cpu"), DistInfo())
    maker = ViewMaker(cfg, stepper.task.needs, stepper.tokenizer, stepper.task.student.visual.patch_size)
    from harmony.data.sources import BuiltinSource

    source = BuiltinSource("train", cfg)
    return stepper, collate([maker(source.load(i).image, source.load(i).caption, seed=i) for i in range(4)])


def test_logit_scale_above_the_cap_comes_back_after_a_step() -> None:
    stepper, batch = clip_stepper()
    student = stepper.task.student
    student.logit_scale.data.fill_(math.log(300.0))
    stepper.train_step(batch)
    assert student.logit_scale.item() <= math.log(100.0) + 1e-6
    assert student.logit_scale.grad is not None and student.logit_scale.grad.abs().item() > 0


# -- 3. gradient clipping per parameter by default, the global norm logged ---------------------------


def test_clip_gradients_per_parameter_and_global() -> None:
    a, b = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))
    for mode, expected in (("per_param", (3.0, 1.0)), ("global", (30 / math.sqrt(101), 3 / math.sqrt(101)))):
        a.grad, b.grad = torch.full((3, 4), 10 / math.sqrt(12)), torch.full((5,), 1 / math.sqrt(5))
        total = clip_gradients([a, b], 3.0, mode)  # type: ignore[arg-type]
        assert total.item() == pytest.approx(math.sqrt(101), rel=1e-6)
        assert a.grad.norm().item() == pytest.approx(expected[0], rel=1e-5)
        assert b.grad.norm().item() == pytest.approx(expected[1], rel=1e-5)
    b.grad = torch.full((5,), float("inf"))
    assert not torch.isfinite(clip_gradients([a, b], 3.0, "per_param"))  # the step will be skipped


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_training_step_clips_as_configured(mode: str) -> None:
    assert tiny("clip-tiny-test").optim.clip_mode == "per_param"
    stepper, batch = clip_stepper("optim.clip_grad=0.01", f"optim.clip_mode={mode}")
    metrics = stepper.train_step(batch)
    norms = torch.stack([p.grad.norm() for p in stepper.params if p.grad is not None])
    assert metrics["grad_norm"].item() > 0.1  # the norm before clipping, over all parameters
    if mode == "per_param":
        assert norms.max().item() == pytest.approx(0.01, rel=1e-3) and (norms > 0.0099).sum() > 3
    else:
        assert norms.norm().item() == pytest.approx(0.01, rel=1e-3) and norms.max().item() < 0.0099


def test_bad_clip_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="clip_mode"):
        tiny("clip-tiny-test", "optim.clip_mode=layer")


# -- 4. text self-distillation: mean per caption over its masked tokens, then over captions ---------


def text_batch(captions: list[str], masked: list[list[int]]) -> dict[str, torch.Tensor]:
    samples = []
    for caption, where in zip(captions, masked):
        ids = TOK(caption)[0]
        mask = torch.zeros(12, dtype=torch.bool)
        mask[where] = True
        masked_ids = torch.where(mask, TOK.mask_id, ids)
        samples.append(
            {"text": ids, "text_real": TOK.real_positions(ids), "text_mask": mask, "text_masked": masked_ids}
        )
    return collate(samples)


CAPTIONS = ["a big red circle on blue", "two stars", "one green square here", "a dot"]
MASKED = [[1, 2, 3, 4], [1], [2, 3], []]  # unequal counts, and a caption with none


def distill_losses(rank: int, world: int) -> tuple[float, float]:
    """(objective loss on this rank's half of CAPTIONS, the per-caption formula over all captions)."""
    cfg = tiny("harmony-tiny-test").objectives.text_distill
    assert cfg is not None
    torch.manual_seed(0)
    objective = TextDistillObjective(cfg, text_width=32)
    student, teacher = torch.randn(4, 12, 32), torch.randn(4, 12, 32)
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    batch = text_batch(CAPTIONS[rows], MASKED[rows])
    width = batch["text"].shape[1]  # collate cut the padding after this half's longest caption
    enc = Encoded(text_masked=student[rows, :width], teacher_text=teacher[rows, :width])
    loss = objective(enc, batch, StepInfo(0, 1)).loss.item()
    with torch.no_grad():
        per_caption = []
        for i, where in enumerate(MASKED):
            if not where:
                per_caption.append(0.0)
                continue
            t = torch.softmax(objective.teacher_head(teacher[i, where]) / cfg.teacher_temp_start, dim=-1)
            s = torch.log_softmax(objective.student_head(student[i, where]) / cfg.student_temp, dim=-1)
            per_caption.append(float(-(t * s).sum(-1).mean()))
    return loss, sum(per_caption) / len(per_caption)


def test_text_distill_averages_per_caption_then_over_captions() -> None:
    loss, expected = distill_losses(0, 1)
    assert loss == pytest.approx(expected, rel=1e-5)


def text_distill_and_clipping_on_this_rank(rank: int, out: Path) -> None:
    """Rank `rank` of 2 (run by tests/two_ranks.py): its half of the text-distillation batch, and its shard
    of the gradients clipped as FSDP shards them; written to `out/<rank>.pt`."""
    loss, expected = distill_losses(rank, 2)
    # FSDP-sharded clipping: each rank holds half of one gradient; per-parameter norms are the full ones
    full = torch.arange(1.0, 9.0)
    shard = torch.nn.Parameter(torch.zeros(4))
    shard.grad = full[rank * 4 : (rank + 1) * 4].clone()
    other = torch.nn.Parameter(torch.zeros(1))
    other.grad = torch.zeros(1) if rank else torch.tensor([0.5])  # a shard of a 1-element parameter
    total = clip_gradients([shard, other], 3.0, "per_param", sharded=True)
    torch.save({"loss": loss, "expected": expected, "total": total, "grad": shard.grad}, out / f"{rank}.pt")


def test_text_distill_and_sharded_clipping_over_two_ranks(two_ranks: TwoRanks) -> None:
    folder = two_ranks.folder("text_distill_and_sharded_clipping")
    results = [torch.load(folder / f"{r}.pt") for r in range(2)]
    # DDP averages the two ranks' gradients: the mean of the rank losses is the loss of the global batch
    mean_loss = (results[0]["loss"] + results[1]["loss"]) / 2
    assert mean_loss == pytest.approx(results[0]["expected"], rel=1e-5)
    full = torch.arange(1.0, 9.0)
    clipped = torch.cat([r["grad"] for r in results])
    torch.testing.assert_close(clipped, full * 3.0 / (full.norm() + 1e-6))
    assert results[0]["total"].item() == pytest.approx(math.sqrt(full.pow(2).sum().item() + 0.25), rel=1e-6)


# -- 5. MAE sums the two crops' losses; each preset keeps its meaning through the weight ------------


def test_mae_loss_sums_the_crops() -> None:
    pred, target = torch.randn(2 * 3, 5, 12), torch.randn(2 * 3, 5, 12)
    per_crop = [mae_loss(pred[c * 3 : (c + 1) * 3], target[c * 3 : (c + 1) * 3]) for c in range(2)]
    assert mae_loss(pred, target, num_crops=2).item() == pytest.approx(sum(per_crop).item(), rel=1e-6)
    weights = {name: tiny(f"{name}-tiny").objectives.mae.weight for name in ("mae", "harmony", "clip+ibot+soft+mae")}
    assert weights == {"mae": 0.5, "harmony": 1.0, "clip+ibot+soft+mae": 1.0}


# -- 6. stochastic depth 0.1 on ViT-S/16 and ViT-B/16 students; teachers without it -----------------


def test_stochastic_depth_per_size_and_printed(cli: Cli) -> None:
    rates = {size: tiny(f"harmony-{size}").model.drop_path_rate for size in ("vit-s16", "vit-b16", "tiny", "tiny-test")}
    assert rates == {"vit-s16": 0.1, "vit-b16": 0.1, "tiny": 0.0, "tiny-test": 0.0}
    proc = cli("train", "--preset", "ibot-vit-s16", "--print-config")
    assert proc.returncode == 0 and "drop_path_rate: 0.1" in proc.stdout


def test_teacher_runs_without_drop_path_in_train_mode() -> None:
    from harmony.train.task import PretrainTask

    torch.manual_seed(0)
    task = PretrainTask(tiny("ibot-tiny-test", "model.drop_path_rate=0.5"), None).train()
    assert task.teacher is not None
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task.teacher.visual(images), task.teacher.visual(images))
        assert not torch.allclose(task.student.visual(images), task.student.visual(images))
