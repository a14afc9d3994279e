"""`harmony bench`: FLOPs charged to their component, saved activations, and the command's figures, options and
refusals. One test runs the real command (its measuring workers in interpreters of their own); the others run
it in this process, workers included, through the same worker arguments."""

from __future__ import annotations

import argparse
import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from harmony.train import bench
from harmony.train.flops import OTHER, ComponentFlops
from tests.conftest import Cli, run_cli


@pytest.fixture
def workers_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `harmony bench`'s workers in this process: their interpreter of their own only keeps each
    measurement's peak memory apart, which these tests do not compare."""

    def measure_here(preset: str, args: argparse.Namespace, accum: int = 1) -> dict[str, Any]:
        printed = io.StringIO()
        with redirect_stdout(printed):
            bench.worker(bench.worker_arguments(preset, args, accum))
        result: dict[str, Any] = json.loads(printed.getvalue().strip().splitlines()[-1])
        return result

    monkeypatch.setattr(bench, "run_isolated", measure_here)


def test_component_flops_charge_forward_and_backward_to_their_component() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
    x = torch.randn(2, 8)
    with ComponentFlops({"a": [a], "b": [b]}) as counter:
        (b(a(x)) @ torch.ones(4, 3)).sum().backward()
    assert counter.flops["a"] == {"forward": 2 * 2 * 8 * 16, "backward": 2 * 2 * 8 * 16}  # no grad wrt x: dW only
    assert counter.flops["b"] == {"forward": 2 * 2 * 16 * 4, "backward": 2 * (2 * 2 * 16 * 4)}  # dW and dX
    assert counter.flops[OTHER]["forward"] == 2 * 2 * 4 * 3
    with FlopCounterMode(display=False) as reference:
        a.zero_grad()
        b.zero_grad()
        (b(a(x)) @ torch.ones(4, 3)).sum().backward()
    assert counter.total() == reference.get_total_flops()


def test_interleaved_branches_are_charged_to_the_branch_that_created_them() -> None:
    """Two towers called alternately; the backward interleaves them, attribution must not."""
    torch.manual_seed(0)
    tower, other = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    with ComponentFlops({"tower": [tower], "other": [other]}) as counter:
        loss = tower(x).sum() + other(x).sum() + tower(2 * x).sum()
        loss.backward()
    one = 2 * 3 * 4 * 4
    assert counter.flops["tower"] == {"forward": 2 * one, "backward": 4 * one}
    assert counter.flops["other"] == {"forward": one, "backward": 2 * one}


@pytest.mark.slow
def test_bench_reports_every_figure_with_ratios_to_clip(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench",
        "--preset",
        "harmony-tiny-test",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert set(results) == {"clip-tiny-test", "harmony-tiny-test"}
    harmony, clip = results["harmony-tiny-test"], results["clip-tiny-test"]
    for key in (
        "flops_per_step",
        "flops_by_component",
        "step_time_s",
        "images_per_s",
        "peak_memory_bytes",
        "ratio_to_clip",
    ):
        assert key in harmony, key
    assert clip["ratio_to_clip"]["flops_per_step"] == 1.0
    assert harmony["ratio_to_clip"]["flops_per_step"] == pytest.approx(
        harmony["flops_per_step"] / clip["flops_per_step"]
    )
    assert sum(harmony["flops_by_component"].values()) == harmony["flops_per_step"]
    assert {"student ViT", "teacher ViT", "text student", "text teacher", "MAE decoder", "MLM decoder", "heads"} <= set(
        harmony["flops_by_component"]
    )
    calls = [p["module"] for p in harmony["passes"]]
    assert calls.count("student.visual") == 3 and calls.count("teacher.visual") == 1
    assert calls.count("student.text") == 1 and calls.count("teacher.text") == 1
    assert "harmony-tiny-test" in proc.stdout and "FLOPs by component" in proc.stdout


def test_saved_activations_count_what_the_backward_keeps_once_per_storage() -> None:
    from harmony.train.memory import SavedActivations

    layer = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    with SavedActivations(layer) as saved:
        y = torch.relu(layer(x))  # keeps x (the input of the matmul) and relu's output; the weight is excluded
        held = saved.current
        y.sum().backward()
    assert held == 2 * 32 * 64 * 4 and saved.peak_bytes == held
    assert saved.current == 0  # freed with the graph


@pytest.mark.usefixtures("workers_here")
def test_bench_compares_accumulation_steps(tmp_path: Path, cli: Cli) -> None:
    out = tmp_path / "bench.json"
    proc = cli(
        "bench", "--preset", "clip-tiny-test", "--batch-size", "4", "--steps", "1", "--warmup", "0",
        "--accum-steps", "1,2", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "gradient accumulation (train.accum_steps = K" in proc.stdout
    results = json.loads(out.read_text())
    one, two = results["clip-tiny-test"], results["clip-tiny-test K=2"]
    assert (one["accum_steps"], two["accum_steps"]) == (1, 2)  # the K each row measured is recorded
    assert two["saved_activations_bytes"] < one["saved_activations_bytes"]
    assert two["flops_per_step"] > one["flops_per_step"]  # the caching pass is extra compute
    bad = cli("bench", "--preset", "clip-tiny-test", "--batch-size", "4", "--accum-steps", "3")
    assert bad.returncode != 0 and "positive divisor of --batch-size 4" in bad.stderr


@pytest.mark.usefixtures("workers_here")
def test_bench_overrides_after_the_options_reach_the_measured_step(tmp_path: Path, cli: Cli) -> None:
    """`harmony bench --preset P key=value`: argparse would hand the override to the `data` subcommand."""
    widths = {}
    for padding in ("batch", "context"):
        out = tmp_path / f"{padding}.json"
        proc = cli(
            "bench", "--preset", "clip-tiny-test", "--batch-size", "2", "--steps", "1", "--warmup", "0",
            "--json", str(out), "model.context_length=77", f"data.caption_padding={padding}",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        passes = json.loads(out.read_text())["clip-tiny-test"]["passes"]
        widths[padding] = next(p["input"][1] for p in passes if p["module"] == "student.text")
    assert widths == {"batch": 32, "context": 77}
    bad = cli("bench", "--preset", "clip-tiny-test", "--batch-size", "2", "data.caption_padding=none")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "data.caption_padding" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_on_a_missing_cuda_device_is_one_line(cli: Cli) -> None:
    proc = cli("bench", "--preset", "clip-tiny-test", "--device", "cuda", "--batch-size", "2")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "no usable CUDA device" in proc.stderr


@pytest.mark.usefixtures("workers_here")
def test_bench_compares_settings_with_the_preset_without_them(tmp_path: Path, cli: Cli) -> None:
    """`--variant model.freeze=image`: a locked tower runs no backward, keeps no activations for it."""
    out = tmp_path / "bench.json"
    proc = cli(
        "bench", "--preset", "clip-tiny-test", "--batch-size", "4", "--steps", "1", "--warmup", "0",
        "--variant", "model.freeze=image", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "settings (--variant) against the same preset without them" in proc.stdout
    results = json.loads(out.read_text())
    plain, frozen = results["clip-tiny-test"], results["clip-tiny-test [model.freeze=image]"]
    assert frozen["variant"] == "model.freeze=image" and plain["variant"] == ""
    vit, frozen_vit = plain["flops_by_component"]["student ViT"], frozen["flops_by_component"]["student ViT"]
    assert frozen_vit < vit / 2  # its forward only (the backward is about twice the forward)
    assert frozen["flops_by_component"]["text student"] == plain["flops_by_component"]["text student"]
    assert frozen["saved_activations_bytes"] < plain["saved_activations_bytes"]
    bad = cli(
        "bench", "--preset", "mae-tiny-test", "--batch-size", "2", "--steps", "1", "--warmup", "0",
        "--variant", "model.freeze=text",
    )  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "names the text tower" in bad.stderr
