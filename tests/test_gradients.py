"""Each objective's gradients reach exactly the parameters they should; teachers get none."""

from __future__ import annotations

import pytest
import torch

from harmony.data.sources import BuiltinSource
from harmony.data.views import ViewMaker, collate
from harmony.models.tokenizer import CaptionTokenizer
from harmony.objectives.base import Encoded, StepInfo
from harmony.objectives.registry import needs_for_config
from harmony.train.task import PretrainTask
from tests.conftest import tiny


def make_task_and_batch(
    preset: str, batch_size: int = 4, overrides: tuple[str, ...] = ()
) -> tuple[PretrainTask, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = tiny(preset, *overrides)
    tokenizer = CaptionTokenizer(cfg.model.context_length)
    task = PretrainTask(cfg, tokenizer if needs_for_config(cfg).needs_text else None)
    maker = ViewMaker(cfg, task.needs, tokenizer, task.student.visual.patch_size)
    source = BuiltinSource("train", cfg)
    samples = [maker(source.load(i).image, source.load(i).caption, seed=i) for i in range(batch_size)]
    return task, collate(samples)


def grads_of(task: PretrainTask, objective: str, batch: dict[str, torch.Tensor]) -> set[str]:
    task.zero_grad(set_to_none=True)
    step = StepInfo(step=10, steps_per_epoch=8)
    enc = task.encode(batch)
    out = task.objectives[objective](enc, batch, step)
    out.loss.backward()
    return {n for n, p in task.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("method", ["harmony", "dino", "flip", "slip", "byol", "filip"])
def test_the_table_of_outputs_says_what_the_passes_compute(method: str) -> None:
    """`Encoded`'s table gives exactly the per-sample outputs the passes compute for the needs, and which of them
    carry a gradient (what gradient accumulation caches, and differentiates); these methods read every output."""
    task, batch = make_task_and_batch(f"{method}-tiny-test", batch_size=2)
    outputs = task.encode(batch).batched()
    assert set(outputs) == Encoded.batched_keys(task.needs)
    for key, value in outputs.items():
        assert value.requires_grad == Encoded.row(key).trained, key


def prefixes(names: set[str]) -> set[str]:
    return {".".join(n.split(".")[:2]) for n in names}


@pytest.mark.parametrize(
    ("preset", "objective", "expected", "forbidden"),
    [
        (
            "clip-tiny-test",
            "clip",
            {
                "student.visual",
                "student.text",
                "student.visual_projection",
                "student.text_projection",
                "student.logit_scale",
            },
            set(),
        ),
        (
            "harmony-tiny-test",
            "clip",
            {"student.visual", "student.text", "student.logit_scale"},
            {"objectives.ibot", "objectives.mae", "objectives.mlm", "objectives.text_distill"},
        ),
        (
            "harmony-tiny-test",
            "ibot",
            {"student.visual", "objectives.ibot"},
            {"student.text", "student.logit_scale", "objectives.mae", "objectives.mlm"},
        ),
        (
            "harmony-tiny-test",
            "mae",
            {"student.visual", "objectives.mae"},
            {"student.text", "objectives.ibot", "objectives.mlm"},
        ),
        (
            "harmony-tiny-test",
            "mlm",
            {"student.text", "objectives.mlm"},
            {"student.visual", "objectives.ibot", "objectives.mae", "student.logit_scale"},
        ),
        (
            "harmony-tiny-test",
            "text_distill",
            {"student.text", "objectives.text_distill"},
            {"student.visual", "objectives.mlm"},
        ),
        ("slip-tiny-test", "simclr", {"student.visual", "objectives.simclr"}, {"student.text"}),
        ("simclr-tiny-test", "simclr", {"student.visual", "objectives.simclr"}, set()),
        (
            "maskclip-tiny-test",
            "masked_distill",
            {"student.visual", "objectives.masked_distill"},
            {"student.text", "objectives.mlm"},
        ),
        ("simsiam-tiny-test", "simsiam", {"student.visual", "objectives.simsiam"}, {"student.text"}),
        ("mocov3-tiny-test", "mocov3", {"student.visual", "objectives.mocov3"}, {"student.text"}),
        ("mocov2-tiny-test", "mocov2", {"student.visual", "objectives.mocov2"}, {"student.text"}),
        ("barlowtwins-tiny-test", "barlowtwins", {"student.visual", "objectives.barlowtwins"}, {"student.text"}),
        ("vicreg-tiny-test", "vicreg", {"student.visual", "objectives.vicreg"}, {"student.text"}),
        ("swav-tiny-test", "swav", {"student.visual", "objectives.swav"}, {"student.text"}),
        (
            "filip-tiny-test",
            "filip",
            {
                "student.visual",
                "student.text",
                "student.visual_projection",
                "student.text_projection",
                "student.logit_scale",
            },
            set(),
        ),
        (
            "siglip-tiny-test",
            "siglip",
            {
                "student.visual",
                "student.text",
                "student.visual_projection",
                "student.text_projection",
                "student.logit_scale",
                "objectives.siglip",
            },
            set(),
        ),
        (
            "flip-tiny-test",
            "flip",
            {
                "student.visual",
                "student.text",
                "student.visual_projection",
                "student.text_projection",
                "student.logit_scale",
            },
            set(),
        ),
    ],
)
def test_gradients_reach_the_right_parameters(
    preset: str, objective: str, expected: set[str], forbidden: set[str]
) -> None:
    task, batch = make_task_and_batch(preset)
    reached = prefixes(grads_of(task, objective, batch))
    assert expected <= reached, f"missing gradients: {expected - reached}"
    assert not (forbidden & reached), f"unexpected gradients: {forbidden & reached}"
    assert not any(n.startswith("teacher.") or ".teacher_head." in n for n in grads_of(task, objective, batch))
    for name, param in task.named_parameters():
        if name.startswith("teacher.") or ".teacher_head." in name:
            assert not param.requires_grad, name


def test_ibot_patch_loss_reaches_the_mask_token() -> None:
    task, batch = make_task_and_batch("ibot-tiny-test", batch_size=8)
    assert batch["ibot_index"].numel() > 0
    assert "student.visual.mask_token" in grads_of(task, "ibot", batch)


def test_one_teacher_pass_serves_every_objective() -> None:
    """Count tower calls in one Harmony step: each distinct input goes through once."""
    task, b = make_task_and_batch("harmony-tiny-test")
    calls: dict[str, list[tuple[int, ...]]] = {
        "student.visual": [],
        "teacher.visual": [],
        "student.text": [],
        "teacher.text": [],
    }
    hooks = []
    for name in calls:
        module = task.get_submodule(name)
        hooks.append(
            module.register_forward_hook(lambda m, args, out, name=name: calls[name].append(tuple(args[0].shape)))
        )
    task.step_losses(b, StepInfo(0, 8))
    for h in hooks:
        h.remove()
    B = 4
    # student vision: (2 masked globals + 1 clean crop) batched, locals batched, MAE-dropped globals batched
    assert calls["student.visual"] == [(3 * B, 3, 32, 32), (2 * B, 3, 16, 16), (2 * B, 3, 32, 32)]
    assert calls["teacher.visual"] == [(2 * B, 3, 32, 32)]
    assert calls["student.text"] == [(2 * B, 24)]  # clean + masked captions in one call
    assert calls["teacher.text"] == [(B, 24)]
