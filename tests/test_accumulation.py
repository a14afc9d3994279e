"""Exact gradient accumulation: K micro-batches give the numbers of the whole batch, for every objective.

Batch-coupled losses (CLIP with hard and soft targets, SimCLR, BYOL's BatchNorm heads, ...) are computed on
the whole batch's cached tower outputs (GradCache); per-sample losses (iBOT, MAE, MLM, text distillation,
MaskCLIP) are weighed by each micro-batch's share; centres, EMA teachers and schedules advance once per
optimiser step. Any of these wrong changes the losses or the parameters below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from harmony.config import ConfigError
from harmony.core.distributed import DistInfo
from harmony.data.sources import BuiltinSource
from harmony.data.views import DERIVED, ViewMaker, add_indices, collate, split_batch
from harmony.presets import build_config
from harmony.train.step import Stepper
from tests.conftest import RESUMABLE, Cli, TwoRanks
from tests.test_distributed import LOSSES, records
from tests.two_ranks import HARMONY_RUN

Batch = dict[str, torch.Tensor]


def make_stepper(preset: str, accum: int, batch_size: int = 8, *overrides: str) -> Stepper:
    cfg = build_config(
        preset, [f"train.batch_size={batch_size}", f"train.accum_steps={accum}", "train.device=cpu", *overrides]
    )
    stepper = Stepper(cfg, torch.device("cpu"), DistInfo())
    stepper.set_span(steps_per_epoch=4, total_steps=12)
    return stepper


def batches(stepper: Stepper, count: int, batch_size: int = 8) -> list[Batch]:
    cfg, task = stepper.cfg, stepper.task
    maker = ViewMaker(cfg, task.needs, stepper.tokenizer, task.student.visual.patch_size)
    source = BuiltinSource("train", cfg)
    out = []
    for step in range(count):
        samples = [source.load(step * batch_size + i) for i in range(batch_size)]
        out.append(collate([maker(s.image, s.caption, seed=100 * step + i) for i, s in enumerate(samples)]))
    return out


def train(preset: str, accum: int, steps: int = 3, *overrides: str) -> tuple[list[dict[str, float]], dict[str, Any]]:
    stepper = make_stepper(preset, accum, 8, *overrides)
    rows = []
    for batch in batches(stepper, steps):
        metrics = stepper.train_step(batch)
        rows.append({k: float(v) for k, v in metrics.items() if k.startswith("loss") or k == "grad_norm"})
    return rows, {k: v.detach().clone() for k, v in stepper.task.state_dict().items()}


FAMILIES = [
    "clip-tiny-test",
    "slip-tiny-test",
    "simclr-tiny-test",
    "ibot-tiny-test",
    "dino-tiny-test",
    "mae-tiny-test",
    "maskclip-tiny-test",
    "byol-tiny-test",
    "simsiam-tiny-test",
    "mocov3-tiny-test",
    "mocov2-tiny-test",
    "siglip-tiny-test",
    "flip-tiny-test",
    "barlowtwins-tiny-test",
    "vicreg-tiny-test",
    "swav-tiny-test",
    "filip-tiny-test",
    "clip+mlm+tdist-tiny-test",
    "harmony-tiny-test",
]

# settings a family runs with here: the image tower's final norm feeds only a projector that starts with a
# BatchNorm'd Linear (a shift of every row is normalised away), so its bias gets a gradient of zero in exact
# arithmetic; AdamW moves it by the sign of the rounding noise, which differs with K, and a loss in the tens
# (Barlow Twins) makes that noise larger than the tolerance
FAMILY_OVERRIDES = {"barlowtwins-tiny-test": ("model.freeze=image.norm",)}


@pytest.mark.parametrize("preset", FAMILIES)
def test_micro_batches_give_the_whole_batch_numbers(preset: str) -> None:
    """K = 1, 2, 4 at the same global batch: the same losses each step and the same parameters, teachers,
    heads and centres after 3 optimiser steps."""
    overrides = FAMILY_OVERRIDES.get(preset, ())
    reference, ref_state = train(preset, 1, 3, *overrides)
    for accum in (2, 4):
        rows, state = train(preset, accum, 3, *overrides)
        for step, (want, got) in enumerate(zip(reference, rows)):
            assert set(got) == set(want)
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (accum, step, key)
        assert set(state) == set(ref_state)
        for key, value in ref_state.items():
            if value.is_floating_point():
                torch.testing.assert_close(state[key], value, rtol=1e-4, atol=2e-5, msg=f"K={accum} {key}")
            else:
                assert torch.equal(state[key], value), key


def test_centres_and_teachers_move_once_per_optimiser_step(monkeypatch: pytest.MonkeyPatch) -> None:
    stepper = make_stepper("harmony-tiny-test", 4)
    calls: list[float] = []
    after_step = stepper.task.after_step
    monkeypatch.setattr(stepper.task, "after_step", lambda momentum: (calls.append(momentum), after_step(momentum)))
    updates: list[int] = []
    center = stepper.task.objectives["ibot"].cls_center
    update = center.update
    monkeypatch.setattr(center, "update", lambda: (updates.append(1), update()))
    for batch in batches(stepper, 2):
        stepper.train_step(batch)
    assert len(calls) == 2 and len(updates) == 2 and stepper.step == 2


def test_split_batch_recomputes_indices_per_micro_batch() -> None:
    stepper = make_stepper("harmony-tiny-test", 1)
    full = batches(stepper, 1)[0]
    micros = split_batch(full, 4)
    assert [m["global"].shape[1] for m in micros] == [2, 2, 2, 2]
    for key, value in full.items():
        if key in DERIVED:
            continue
        dim = 1 if value.shape[0] != 8 else 0
        torch.testing.assert_close(torch.cat([m[key] for m in micros], dim=dim), value)
    for micro in micros:
        again = add_indices({k: v for k, v in micro.items() if k not in DERIVED})
        assert set(DERIVED) <= set(micro)
        for key in DERIVED:
            torch.testing.assert_close(micro[key], again[key])
    with pytest.raises(ValueError, match="does not split into 3"):
        split_batch(full, 3)


def test_recomputation_replays_the_random_state_of_the_cached_pass() -> None:
    """With stochastic depth, the graph pass of each micro-batch must see the function its cache pass saw."""
    stepper = make_stepper("clip-tiny-test", 2, 8, "model.drop_path_rate=0.5")
    assert not stepper.task.deterministic_student()
    seen: list[torch.Tensor] = []
    hook = stepper.task.student.visual.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    stepper.train_step(batches(stepper, 1)[0])
    hook.remove()
    assert len(seen) == 4  # two cache passes, then two graph passes
    torch.testing.assert_close(seen[2], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(seen[3], seen[1], rtol=0, atol=0)
    assert not torch.equal(seen[0], seen[1])


def test_a_non_finite_micro_batch_skips_the_whole_step() -> None:
    stepper = make_stepper("harmony-tiny-test", 2)
    batch = batches(stepper, 1)[0]
    batch["global"] = batch["global"].float()
    batch["global"][0, 5, 0, 0, 0] = float("nan")  # one image of the second micro-batch
    before = {k: v.clone() for k, v in stepper.task.state_dict().items()}
    metrics = stepper.train_step(batch)
    assert not math.isfinite(float(metrics["loss"]))
    assert int(stepper.bad_steps) == 1
    for key, value in stepper.task.student.state_dict().items():
        assert torch.equal(value, before[f"student.{key}"]), key


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_accumulates_like_the_whole_batch(precision: str) -> None:
    reference, _ = train("harmony-tiny-test", 1, 2, f"train.precision={precision}")
    rows, _ = train("harmony-tiny-test", 2, 2, f"train.precision={precision}")
    for want, got in zip(reference, rows):
        assert math.isfinite(got["loss"])
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)


@pytest.mark.slow
def test_a_compiled_student_accumulates_like_the_eager_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """`train.compile=true` with K = 2: the caching pass (no gradient) and the graph pass of each micro-batch go
    through the compiled student and give the eager numbers and names. Compiled with `aot_eager`: TorchDynamo's
    capture and AOTAutograd's forward and backward graphs, what accumulation meets, without inductor's C++
    build (inductor's own kernels against eager: tests/test_gpu_check.py)."""
    aot_eager, graphs = torch._dynamo.lookup_backend("aot_eager"), []

    def backend(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        graphs.append(graph)
        return aot_eager(graph, inputs)

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda module, *a, **kw: compile_module(module, *a, **{**kw, "backend": backend})
    )
    eager, eager_state = train("clip-tiny-test", 2, 2)
    try:
        compiled, compiled_state = train("clip-tiny-test", 2, 2, "train.compile=true")
    finally:
        torch._dynamo.reset()  # the compiled frames are this test's alone
    assert len(graphs) == 2  # the caching pass and the graph pass, each compiled once for both steps
    for want, got in zip(eager, compiled):
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    assert set(compiled_state) == set(eager_state)


def test_accumulation_must_divide_each_ranks_batch() -> None:
    with pytest.raises(ConfigError, match=r"'train\.accum_steps' \(3\) must divide train.batch_size \(8\)"):
        build_config("clip-tiny-test", ["train.batch_size=8", "train.accum_steps=3"])
    with pytest.raises(ConfigError, match=r"'train\.accum_steps' must be positive"):
        build_config("clip-tiny-test", ["train.accum_steps=0"])
    from harmony.train.step import TrainingError, accumulation_steps

    cfg = build_config("clip-tiny-test", ["train.batch_size=12", "train.accum_steps=4"])
    with pytest.raises(TrainingError, match="does not divide the 6 images each of the 2 process"):
        accumulation_steps(cfg, DistInfo(rank=0, world_size=2))


@pytest.mark.slow
def test_accum_steps_flag_reaches_the_run_and_resume_continues_exactly(
    tmp_path: Path, cli: Cli, one_rank: Callable[..., Path]
) -> None:
    split = tmp_path / "split"
    first = cli("train", *RESUMABLE, "--out", str(split), "--max-steps", "2", "--accum-steps", "2")
    assert first.returncode == 0, first.stderr
    assert "accum_steps: 2" in (split / "config.yaml").read_text()
    # K may change on resume (the numbers do not depend on it), without --force
    second = cli("train", *RESUMABLE, "--out", str(split), "--resume", "auto", "--max-steps", "4", "--accum-steps", "4")
    assert second.returncode == 0, second.stderr
    assert "train.accum_steps: 2 -> 4" in second.stdout
    rows, refs = records(split), records(one_rank("train", *RESUMABLE, "--max-steps", "4"))
    assert sorted(rows) == [1, 2, 3, 4]
    for step in range(1, 5):
        for key in LOSSES:
            assert rows[step][key] == pytest.approx(refs[step][key], rel=1e-4, abs=1e-5), (step, key)
    bad = cli("train", *RESUMABLE, "--out", str(tmp_path / "bad"), "--batch-size", "8", "--accum-steps", "3")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "train.accum_steps" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_accumulating_equal_one_rank_with_the_whole_batch(
    two_ranks: TwoRanks, one_rank: Callable[..., Path], strategy: str
) -> None:
    """2 gloo ranks x K = 2 (micro-batches of 2) against 1 process x K = 1, global batch 8: the gather over
    ranks of the cached embeddings, the manual gradient average (DDP) or FSDP's reduce-scatter per backward."""
    a, b = records(one_rank(*HARMONY_RUN)), records(two_ranks.folder(f"{strategy}_accumulating") / "run")
    for step in range(1, 6):
        for key in LOSSES:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
