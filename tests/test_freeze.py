"""Locked and partly trained towers: `model.freeze`, `model.freeze_until_step` and `optim.layer_decay`.

A frozen parameter must stay bit-identical, be out of the optimiser (no AdamW state, no weight decay), out of
gradient clipping, DDP and FSDP (2 ranks give 1 rank's numbers), out of gradient accumulation's cached gradients
(K = 2 gives K = 1's numbers without running the frozen tower again); a tower held until step N starts its AdamW
state there as new; resume stays exact on either side of N.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from harmony.config import ConfigError
from harmony.core import checkpoint as ckpt
from harmony.presets import build_config
from harmony.train.optim import set_schedule
from harmony.train.step import Stepper
from tests.conftest import Cli, TwoRanks
from tests.test_accumulation import batches, make_stepper, train
from tests.test_distributed import LOSSES, records
from tests.two_ranks import FROZEN, HARMONY_RUN


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Parameter name -> whether it is bit-identical to `before`."""
    return {name: torch.equal(p, before[name]) for name, p in module.named_parameters()}


def optimised(stepper: Stepper) -> set[int]:
    return {id(p) for group in stepper.optimizer.param_groups for p in group["params"]}


def test_a_locked_image_tower_stays_bit_identical_out_of_the_optimiser_and_clipping() -> None:
    """LiT: `model.freeze=image` with CLIP; 20 steps (clipping active: a clip norm every gradient exceeds)."""
    stepper = make_stepper("clip-tiny-test", 1, 4, "model.freeze=image", "optim.clip_grad=1e-3")
    stepper.set_span(steps_per_epoch=4, total_steps=20)
    student = stepper.task.student
    assert student.text is not None
    image, text, projection = snapshot(student.visual), snapshot(student.text), student.visual_projection.weight
    first_projection = projection.detach().clone()
    data = batches(stepper, 4, batch_size=4)
    for step in range(20):
        stepper.train_step(data[step % 4])
    assert all(unchanged(student.visual, image).values())
    assert not any(unchanged(student.text, text).values())
    assert not torch.equal(projection, first_projection)  # its projection trains (LiT's image head)
    frozen = list(student.visual.parameters())
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert not {id(p) for p in frozen} & (optimised(stepper) | {id(p) for p in stepper.params})
    trained = [p for p in stepper.task.student_modules().parameters() if p.requires_grad]
    assert {id(p) for p in stepper.optimizer.state} == {id(p) for p in trained}


def test_parts_and_block_ranges_freeze_only_what_they_name() -> None:
    """With gradient checkpointing: the blocks after a frozen stem still get their gradients."""
    stepper = make_stepper(
        "clip-tiny-test", 1, 8, "model.freeze=image.embed,image.blocks.0,text.norm", "model.grad_checkpointing=true"
    )
    student = stepper.task.student
    assert student.text is not None
    image, text = snapshot(student.visual), snapshot(student.text)
    for batch in batches(stepper, 2):
        stepper.train_step(batch)
    same = unchanged(student.visual, image) | {f"text.{k}": v for k, v in unchanged(student.text, text).items()}
    # (CLIP has no masks: its mask token never trains)
    held = ("vit.patch_embed.", "vit.pos_embed", "vit.cls_token", "mask_token", "vit.blocks.0.", "text.ln_final.")
    assert {name for name, kept in same.items() if kept} == {name for name in same if name.startswith(held)}


def test_towers_wait_for_freeze_until_step_then_start_with_fresh_adamw_state() -> None:
    stepper = make_stepper("clip-tiny-test", 1, 8, "model.freeze_until_step=2")
    student = stepper.task.student
    assert student.text is not None
    towers, projection = nn.ModuleList([student.visual, student.text]), student.visual_projection.weight
    start, first_projection = snapshot(towers), projection.detach().clone()
    data = batches(stepper, 3)
    for step in range(2):
        stepper.train_step(data[step])
        assert all(unchanged(towers, start).values()), step
    assert not torch.equal(projection, first_projection)
    stepper.train_step(data[2])
    assert not any(name for name, kept in unchanged(towers, start).items() if kept and name != "0.mask_token")
    block = student.visual.vit.blocks[0].attn.qkv.weight
    assert float(stepper.optimizer.state[block]["step"]) == 1  # bias correction from step N, as a new parameter
    assert float(stepper.optimizer.state[projection]["step"]) == 3


def test_layer_decay_gives_each_layer_its_lr_after_every_schedule_update() -> None:
    stepper = make_stepper("clip-tiny-test", 1, 8, "optim.layer_decay=0.5")
    named = dict(stepper.task.student_modules().named_parameters())
    expected = {  # tiny-test: 2 blocks in each tower, so the stem is layer 0 of 0..3
        "student.visual.vit.cls_token": 0.5**3,
        "student.visual.vit.pos_embed": 0.5**3,
        "student.visual.vit.patch_embed.proj.weight": 0.5**3,
        "student.visual.vit.blocks.0.attn.qkv.weight": 0.5**2,
        "student.visual.vit.blocks.1.mlp.fc2.bias": 0.5,
        "student.visual.vit.norm.weight": 1.0,
        "student.visual_projection.weight": 1.0,
        "student.text.token_embedding.weight": 0.5**3,
        "student.text.transformer.resblocks.0.attn.in_proj_weight": 0.5**2,
        "student.text.transformer.resblocks.1.ln_2.bias": 0.5,
        "student.text.ln_final.weight": 1.0,
        "student.text_projection": 1.0,
        "student.logit_scale": 1.0,
    }

    def lr_of() -> dict[str, float]:
        lrs = {id(p): group["lr"] for group in stepper.optimizer.param_groups for p in group["params"]}
        return {name: lrs[id(named[name])] for name in expected}

    set_schedule(stepper.optimizer, 1.0, 0.1)
    assert lr_of() == expected
    stepper.train_step(batches(stepper, 1)[0])
    peak = stepper.schedules.lr(0)
    assert lr_of() == {name: peak * scale for name, scale in expected.items()}
    decays = {id(p): group["weight_decay"] for group in stepper.optimizer.param_groups for p in group["params"]}
    assert decays[id(named["student.visual.vit.blocks.0.attn.qkv.weight"])] > 0  # weight decay stays per group
    assert decays[id(named["student.visual.vit.blocks.0.attn.qkv.bias"])] == 0
    plain = make_stepper("clip-tiny-test", 1)  # layer_decay 1: today's two groups
    assert [(g["scheduled_wd"], g["lr_scale"]) for g in plain.optimizer.param_groups] == [(True, 1.0), (False, 1.0)]


@pytest.mark.parametrize(
    "preset, settings",
    [
        ("clip-tiny-test", ("model.freeze=image",)),
        ("harmony-tiny-test", ("model.freeze=image", "model.freeze_until_step=2")),
    ],
)
def test_accumulating_with_a_frozen_tower_gives_the_whole_batch_numbers(preset: str, settings: tuple[str]) -> None:
    reference, ref_state = train(preset, 1, 3, *settings)
    rows, state = train(preset, 2, 3, *settings)
    for step, (want, got) in enumerate(zip(reference, rows)):
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (step, key)
    for key, value in ref_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=2e-5, msg=key)


def test_accumulation_runs_a_frozen_tower_once_per_micro_batch() -> None:
    """CLIP with K = 2: a trained tower runs in the caching pass and again with its graph; a frozen one only in
    the caching pass, its outputs reused."""
    calls = {"": 0, "image": 0}
    for freeze in calls:
        stepper = make_stepper("clip-tiny-test", 2, 8, f"model.freeze={freeze}")
        stepper.task.student.visual.register_forward_hook(
            lambda *_, freeze=freeze: calls.update({freeze: calls[freeze] + 1})
        )
        stepper.train_step(batches(stepper, 1)[0])
    assert calls == {"": 4, "image": 2}


def test_bad_settings_are_refused_in_one_line(tmp_path: Path, cli: Cli) -> None:
    for overrides, message in [
        (["model.freeze=imag"], "'imag' names no tower"),
        (["model.freeze=image.blocks.0-5"], "'image.blocks.0-5': the image tower has 2 blocks, 0-1"),
        (["model.freeze=image.blocks.1-0"], "runs backwards"),
        (["model.freeze=text.head"], "the text tower has no part 'head'"),
        (["model.freeze_until_step=-1"], "model.freeze_until_step"),
        (["optim.layer_decay=0"], "optim.layer_decay"),
        (["optim.layer_decay=1.5"], "optim.layer_decay"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_config("clip-tiny-test", overrides)
    for preset, pattern, message in [
        ("clip-tiny-test", "imag", "'imag' names no tower"),
        ("mae-tiny-test", "text", "'text' names the text tower; mae-tiny-test has none"),
        ("clip-tiny-test", "image.norm_pre", "'image.norm_pre' matches no trained parameter"),  # no pre-norm here
    ]:
        out = tmp_path / preset / pattern
        proc = cli("train", "--preset", preset, "--out", str(out), "--max-steps", "1", f"model.freeze={pattern}")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "model.freeze" in proc.stderr and message in proc.stderr
        assert not (out / "checkpoints").exists()


def optimiser_steps(checkpoint: Path) -> dict[str, float]:
    """Parameter name -> AdamW's step count in a plain checkpoint."""
    state = ckpt.load(checkpoint)
    names = state["optimizer_params"]
    return {names[int(i)]: float(s["step"]) for i, s in state["optimizer"]["state"].items()}


@pytest.mark.slow
def test_resume_on_either_side_of_freeze_until_step_is_exact(tmp_path: Path, cli: Cli) -> None:
    """One run of 4 steps (towers from step 2), its checkpoints after steps 1 and 3 continued to 4 elsewhere; a
    change of `model.freeze` is refused, and with --force unlocks the tower with fresh AdamW state."""
    common = ("train", "--preset", "clip-tiny-test", "--workers", "0", "--no-progress", "--batch-size", "8")
    args = (*common, "--max-steps", "4", "train.log_every=1", "train.save_every=1", "train.keep_last=4")
    whole = tmp_path / "whole"
    assert cli(*args, "model.freeze_until_step=2", "--out", str(whole)).returncode == 0
    final = ckpt.load(whole / "checkpoints" / "last.pt")["model"]
    for saved in (1, 3):
        out = tmp_path / f"from{saved}"
        resumed = cli(*args, "--resume", str(whole / "checkpoints" / f"step_{saved:08d}.pt"), "--out", str(out))
        assert resumed.returncode == 0, resumed.stderr
        rows, ref = records(out), records(whole)
        assert sorted(rows) == list(range(saved + 1, 5))
        for step in rows:
            assert rows[step]["loss"] == ref[step]["loss"], (saved, step)
        state = ckpt.load(out / "checkpoints" / "last.pt")["model"]
        assert all(torch.equal(state[k], v) for k, v in final.items()), saved
    steps = optimiser_steps(whole / "checkpoints" / "last.pt")
    assert steps["student.visual.vit.blocks.0.attn.qkv.weight"] == 2 and steps["student.visual_projection.weight"] == 4

    locked = tmp_path / "locked"
    assert cli(*args, "model.freeze=image", "--out", str(locked)).returncode == 0
    more = ("--resume", "auto", "--out", str(locked), "--max-steps", "6", "model.freeze=[]")
    refused = cli(*common, *more)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "model.freeze" in refused.stderr and "--force" in refused.stderr
    unlocked = cli(*common, *more, "--force")
    assert unlocked.returncode == 0, unlocked.stderr
    steps = optimiser_steps(locked / "checkpoints" / "last.pt")
    assert steps["student.visual.vit.blocks.0.attn.qkv.weight"] == 2 and steps["student.text_projection"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_with_a_frozen_tower_equal_one_rank(
    two_ranks: TwoRanks, one_rank: Callable[..., Path], strategy: str
) -> None:
    """Image tower locked, text tower held for 2 steps (DDP rebuilt over the released tower; FSDP units with no
    trained parameter): 2 gloo ranks x 4 images give 1 process x 8; the locked tower ends as in one process, its
    EMA teacher equal to it, while the released text tower trained (its teacher lags)."""
    reference, run = one_rank(*HARMONY_RUN, *FROZEN), two_ranks.folder(f"{strategy}_frozen") / "run"
    one, two = records(reference), records(run)
    for step in range(1, 6):
        for key in LOSSES:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (step, key)
    state: dict[str, Any] = ckpt.load(run / "checkpoints" / "last.pt")["model"]
    single: dict[str, Any] = ckpt.load(reference / "checkpoints" / "last.pt")["model"]
    image = [k for k in state if k.startswith("student.visual.")]
    for key in image:
        assert torch.equal(state[key], single[key]), key
        assert torch.equal(state[key.replace("student.", "teacher.", 1)], state[key]), key
    assert not torch.equal(state["student.text.ln_final.weight"], single["teacher.text.ln_final.weight"])


def resume_after_the_warm_up_on_this_rank(strategy: str, folder: Path) -> None:
    """Run on each of two ranks (tests/two_ranks.py): 4 steps with the text tower held for 2, then the same run
    continued from its checkpoint after step 3 (the released tower's AdamW state, DDP over it, FSDP's optimiser
    state by name): rank 0 finds the same weights and optimiser moments, bit for bit."""
    import torch.distributed as dist

    from harmony.cli import main
    from tests.two_ranks import HARMONY

    args = ["train", *HARMONY, *FROZEN, f"train.strategy={strategy}", "--max-steps", "4", "train.save_every=1"]
    assert main([*args, "--out", str(folder / "whole")]) == 0
    resumed = ["train", "--no-progress", "--resume", str(folder / "whole" / "checkpoints" / "step_00000003.pt")]
    assert main([*resumed, "--out", str(folder / "resumed")]) == 0
    if dist.get_rank() == 0:
        whole, again = (ckpt.load(folder / run / "checkpoints" / "last.pt") for run in ("whole", "resumed"))
        for key, value in whole["model"].items():
            assert torch.equal(again["model"][key], value), key
        moments = {name: state["exp_avg"] for name, state in again["optimizer"]["state"].items()}
        assert moments  # FSDP keeps the optimiser state by parameter name
        for name, state in whole["optimizer"]["state"].items():
            assert torch.equal(moments[name], state["exp_avg"]), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_resume_after_the_warm_up_exactly(two_ranks: TwoRanks, strategy: str) -> None:
    two_ranks.folder(f"{strategy}_frozen_resumed")
