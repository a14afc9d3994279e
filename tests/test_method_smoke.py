"""The methods added through the registry alone (BYOL, SimSiam, SigLIP, MoCo v3, FLIP, MoCo v2, SimCLR, ALIGN,
Barlow Twins, VICReg, SwAV, FILIP), end to end: each is
listed by `harmony presets`, trains two steps with finite losses in its range, and the benchmark's FLOP
breakdown has its parts; then what is particular to one of them (SigLIP's scale and bias, FLIP's evaluation on
full images). Training runs `harmony train` in this process; the benchmark's measurement is `harmony bench`'s
own (tests/test_bench.py runs the command itself)."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from harmony.core import checkpoint as ckpt
from harmony.loading import load
from harmony.train.bench import measure
from tests.conftest import Cli, in_process


@dataclass(frozen=True)
class Smoke:
    """What a method's two-step run and its benchmark must show."""

    loss_in_range: Callable[[float], bool]  # its loss term, at every logged step
    parts: frozenset[str]  # FLOP components the benchmark reports for it
    heads: bool = False  # its heads cost FLOPs
    no_teacher: bool = False  # no EMA tower: no (or zero) teacher FLOPs
    positive: tuple[str, ...] = ()  # logged metrics that must be above 0
    objective: str = ""  # the objective whose loss is checked, when not the method's own (ALIGN: clip)


SMOKE = {
    "byol": Smoke(lambda v: 0.0 <= v <= 8.0, frozenset({"student ViT", "teacher ViT", "heads"}), heads=True),
    "simsiam": Smoke(
        lambda v: -1.0 <= v <= 1.0,
        frozenset({"student ViT", "heads"}),
        heads=True,
        no_teacher=True,
        positive=("simsiam_output_std",),
    ),
    "siglip": Smoke(lambda v: math.isfinite(v) and v > 0, frozenset({"student ViT", "text student"})),
    # near 2 * 2 tau * log N (tau 0.2, N 8) at the start
    "mocov3": Smoke(
        lambda v: 0.0 <= v <= 2 * 2 * 0.2 * math.log(8) + 0.5,
        frozenset({"student ViT", "teacher ViT", "heads"}),
        heads=True,
    ),
    "flip": Smoke(lambda v: math.isfinite(v) and v > 0, frozenset({"student ViT", "text student"})),
    "simclr": Smoke(
        lambda v: math.isfinite(v) and v > 0, frozenset({"student ViT", "heads"}), heads=True, no_teacher=True
    ),
    # InfoNCE over the key and 64 queued negatives: at most about log 65 while the queue fills
    "mocov2": Smoke(
        lambda v: 0.0 <= v <= math.log(65) + 0.5, frozenset({"student ViT", "teacher ViT", "heads"}), heads=True
    ),
    # CLIP's loss on a CNN and a bidirectional text tower: near log N (N 8) at the start
    "align": Smoke(
        lambda v: 0.0 < v <= math.log(8) + 1.5, frozenset({"student CNN", "text student"}), objective="clip"
    ),
    # at most out_dim (64) on the diagonal plus lambda x the 64 x 63 off-diagonal entries, each C_ij^2 <= 1
    "barlowtwins": Smoke(
        lambda v: 0.0 <= v <= 64 + 5e-3 * 64 * 63,
        frozenset({"student ViT", "heads"}),
        heads=True,
        no_teacher=True,
        positive=("barlowtwins_on_diag", "barlowtwins_off_diag"),
    ),
    # 25 x the MSE of two BatchNorm'd expansions, 25 x the hinge (at most 1), the covariances: tens at the start
    "vicreg": Smoke(
        lambda v: 0.0 < v < 200.0,
        frozenset({"student ViT", "heads"}),
        heads=True,
        no_teacher=True,
        positive=("vicreg_invariance", "vicreg_variance", "vicreg_covariance"),
    ),
    # a cross-entropy against soft codes over 32 prototypes at tau 0.1: a few nats
    "swav": Smoke(lambda v: 0.0 < v < 20.0, frozenset({"student ViT", "heads"}), heads=True, no_teacher=True),
    "filip": Smoke(lambda v: math.isfinite(v) and v > 0, frozenset({"student ViT", "text student"}), no_teacher=True),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`trained(method)`: the folder of a two-step `harmony train` of `<method>-tiny-test` (once per module)."""
    runs: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(method) / "run"
            proc = in_process(
                "train", "--preset", f"{method}-tiny-test", "--data", "builtin:shapes", "--out", str(out),
                "--max-steps", "2", "--workers", "0", "--no-progress", "train.log_every=1",
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            runs[method] = out
        return runs[method]

    return run


@functools.cache
def benched(method: str) -> dict[str, Any]:
    """`harmony bench --preset <method>-tiny-test --batch-size 2 --steps 1 --warmup 0`'s measurement."""
    return measure(f"{method}-tiny-test", [], "cpu", batch_size=2, steps=1, warmup=0)


@pytest.mark.parametrize("method", sorted(SMOKE))
def test_method_is_a_preset_trains_and_is_benched(method: str, trained: Callable[[str], Path], cli: Cli) -> None:
    smoke = SMOKE[method]
    presets = cli("presets")
    assert presets.returncode == 0 and f"{method} " in presets.stdout
    rows = [json.loads(line) for line in (trained(method) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert smoke.loss_in_range(row[f"loss_{smoke.objective or method}"]), row
        assert all(row[key] > 0.0 for key in smoke.positive), row
    result = benched(method)
    flops = result["flops_by_component"]
    assert result["flops_per_step"] > 0 and smoke.parts <= set(flops), flops
    if smoke.heads:
        assert flops["heads"] > 0
    if smoke.no_teacher:
        assert "teacher ViT" not in flops or flops["teacher ViT"] == 0


def test_siglip_starts_from_its_scale_and_bias(trained: Callable[[str], Path]) -> None:
    run = trained("siglip")
    section = yaml.safe_load((run / "config.yaml").read_text())["objectives"]["siglip"]
    assert section["logit_scale_init"] == 10.0 and section["logit_bias_init"] == -10.0
    state = ckpt.load(run / "checkpoints" / "last.pt")["model"]
    # two AdamW steps at a warm-up learning rate move a parameter by far less than 0.01
    assert state["student.logit_scale"].item() == pytest.approx(math.log(10.0), abs=0.01)
    assert state["objectives.siglip.logit_bias"].item() == pytest.approx(-10.0, abs=0.01)


def test_flip_trains_on_kept_patches_and_evaluates_on_full_images(
    tmp_path: Path, trained: Callable[[str], Path], cli: Cli
) -> None:
    run = trained("flip")
    passes = benched("flip")["passes"]
    student_passes = [p["input"] for p in passes if p["module"] == "student.visual"]
    assert student_passes == [[2, 3, 32, 32]]  # one (patch-dropped) image pass, no clean one
    pretrained = load(run)
    with torch.no_grad():  # evaluation sees every patch
        tokens = pretrained.model.visual(torch.zeros(1, 3, 32, 32))
    assert tokens.shape[1] == 1 + 16
    zeroshot = tmp_path / "zs.json"
    proc = cli(
        "eval", "zeroshot", "--checkpoint", str(run), "--data", "builtin:shapes:val", "--out", str(zeroshot),
        "--workers", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(zeroshot.read_text())
    assert result["task"] == "zeroshot" and 0.0 <= result["metrics"]["top1"] <= 1.0
