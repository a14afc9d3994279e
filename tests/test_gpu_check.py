"""`harmony check gpu`: its CPU rehearsal end to end from an installed copy of the package, the part
runner and the CUDA-path check runner (time limits, crashes, hangs, the overall deadline), and the
report's targets. The CUDA-path checks themselves run on the CPU in tests/test_cuda.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harmony.check import device_checks
from harmony.check import parts as check_parts
from harmony.check.device_checks import run_checks
from harmony.check.parts import summarise_training
from harmony.check.plan import PARTS, cpu_plan, gpu_plan
from harmony.check.report import markdown, targets
from harmony.check.runner import Part, PartResult, run_part, run_parts
from tests.conftest import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}


def check_cli(
    *args: str, cwd: Path = REPO, timeout: float = 900, env: dict[str, str] = ENV
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harmony.check", "gpu", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def installed_copy(folder: Path) -> Path:
    """The package as `pip install .` (no dependencies, offline) puts it, in `folder`/site: no tests, no
    repository around it. pip builds from a copy of the sources, so the repository gets no build files."""
    source, site = folder / "source", folder / "site"
    shutil.copytree(REPO / "harmony", source / "harmony", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    pip += ["--disable-pip-version-check", "--quiet", "--target", str(site), str(source)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    return site


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_part_and_writes_the_report(tmp_path: Path) -> None:
    """From an installed copy, in a folder outside the repository: the check needs no clone."""
    # one thread: the tiny-test models run faster on one than on two, and far faster on shared cores
    env = {**ENV, "PYTHONPATH": str(installed_copy(tmp_path)), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "elsewhere"
    run.mkdir()
    where = subprocess.run([sys.executable, "-c", "import harmony; print(harmony.__file__)"], env=env, cwd=run,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert where.stdout.startswith(str(tmp_path / "site"))
    out = run / "check-gpu-rehearsal"
    proc = check_cli("--device", "cpu", "--out", out.name, "--quiet", cwd=run, env=env)  # a relative --out
    report = json.loads((out / "report.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert proc.returncode == 0, [(p["name"], p["error"]) for p in report["parts"]]
    assert list(parts) == list(PARTS) and all(p["status"] == "ok" for p in parts.values())

    # the rehearsal runs two of the CUDA-path checks (tests/test_cuda.py runs every one on the CPU)
    tests = {t["name"]: t["outcome"] for t in parts["cuda-tests"]["data"]["tests"]}
    assert tests == {name: "passed" for name in cpu_plan().test_checks}

    runs = parts["bench"]["data"]["runs"]
    assert [(r["preset"], r["batch_size"]) for r in runs] == [("clip-tiny-test", 2), ("harmony-tiny-test", 2)]
    assert all(r["flops_per_step"] > 0 and r["step_time_s"] > 0 for r in runs)
    assert parts["data"]["data"]["loader"]["images_per_s"] > 0
    paths = parts["data"]["data"]["paths"]
    assert [p["preset"] for p in paths] == ["clip-tiny-test", "harmony-tiny-test"]
    assert all(p["worker_path_ms_per_image"] > 0 and p["device_augment_ms_per_image"] > 0 for p in paths)
    assert all(p["device_images_per_s"] > 0 and p["images"] == 8 for p in paths)

    train = parts["train"]["data"]
    assert train["steps"] == 16 and 0 <= train["data_wait_share"] < 1
    assert {"loss_clip", "loss_ibot", "loss_mae", "loss_mlm", "loss_text_distill"} <= set(train["terms"])
    assert all(t["finite"] and t["falling"] is not False for t in train["terms"].values())

    verdicts = {t["name"].split(" ")[1] + t["name"][:8]: t["verdict"] for t in report["targets"]}
    assert verdicts["clipViT-B/16"] == "not measured"  # no MFU without a known peak
    text = (out / "report.md").read_text()
    for heading in (
        "## Parts",
        "## Acceptance targets",
        "## cuda checks",
        "## Training step",
        "## Loader",
        "device_augment",
    ):
        assert heading in text
    assert "CPU rehearsal" in text and proc.stdout.startswith("# harmony check gpu")


def test_without_a_gpu_the_check_fails_in_its_report_and_exits_1(tmp_path: Path) -> None:
    proc = check_cli("--device", "cuda", "--out", str(tmp_path), "--parts", "env", "--quiet")
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(p["name"], p["status"]) for p in report["parts"]] == [("env", "failed")]
    assert "no usable CUDA device" in report["parts"][0]["error"]
    assert "| env | failed |" in (tmp_path / "report.md").read_text()


def test_user_mistakes_are_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    proc = check_cli("--device", "cpu", "--out", str(a_file))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "is a file" in proc.stderr
    proc = check_cli("--device", "cpu", "--out", str(tmp_path / "o"), "--parts", "bench,gpus")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown part(s) gpus" in proc.stderr


# -- the runner: every part reports, whatever another part does ------------------------------


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


WRITE = "import json, sys; open(sys.argv[1], 'w').write(json.dumps({{'data': {data}}}))"


def test_a_failing_crashing_or_hanging_part_does_not_stop_the_others(tmp_path: Path) -> None:
    grandchild = tmp_path / "grandchild.pid"
    hang = (
        "import json, subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(grandchild)!r}, 'w').write(str(p.pid))\n"
        "open(sys.argv[1], 'w').write(json.dumps({'data': {'measured': 1}}))\n"
        "time.sleep(60)\n"
    )
    fail = (
        "import json, sys; open(sys.argv[1], 'w').write(json.dumps({'data': {}, 'error': 'loss is nan'})); sys.exit(1)"
    )
    parts = [
        Part("hangs", [*py(hang), "{out}"], 5),
        Part("fails", [*py(fail), "{out}"], 10),
        Part("crashes", py("import os; os.abort()"), 10),
        Part("works", [*py(WRITE.format(data="{'x': 2}")), "{out}"], 10),
    ]
    results = {r.name: r for r in run_parts(parts, 35, tmp_path, progress=False)}  # no time to spare: 5 s to hang
    assert results["fails"].status == "failed" and results["fails"].error.startswith("loss is nan")
    assert results["crashes"].status == "failed" and "killed by signal 6" in results["crashes"].error
    hung = results["hangs"]
    assert hung.status == "failed" and "timed out" in hung.error and hung.data == {"measured": 1}
    assert results["works"].status == "ok" and results["works"].data == {"x": 2}
    assert not alive(int(grandchild.read_text()))  # the hung part's own subprocess went down with it


def alive(pid: int) -> bool:
    """Running (a killed process whose new parent has not reaped it yet is a zombie: not alive)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


def test_ctrl_c_stops_the_running_part_and_reports_what_ran(tmp_path: Path) -> None:
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from harmony.check.runner import Part, run_parts\n"
        f"work = Path({str(tmp_path)!r})\n"
        f"parts = [Part('quick', {py('pass')!r}, 5), Part('hangs', {py('import time; time.sleep(60)')!r}, 60),"
        f" Part('later', {py('pass')!r}, 5)]\n"
        "print(json.dumps([(r.name, r.status, r.error) for r in run_parts(parts, 100, work)]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("[check] hangs: up to"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert json.loads(out) == [
        ["quick", "ok", ""],
        ["hangs", "failed", "interrupted (Ctrl-C)"],
        ["later", "skipped", "skipped: interrupted"],
    ]


def test_parts_that_no_longer_fit_the_deadline_are_skipped(tmp_path: Path) -> None:
    parts = [Part(n, [*py(WRITE.format(data="{}")), "{out}"], 10) for n in ("a", "b")]
    results = run_parts(parts, 2, tmp_path, progress=False)
    assert [(r.name, r.status, r.error) for r in results] == [
        ("a", "skipped", "skipped: out of time"),
        ("b", "skipped", "skipped: out of time"),
    ]


def test_a_part_may_use_time_left_over_but_not_the_later_parts_budgets(tmp_path: Path) -> None:
    seconds = [*py(WRITE.format(data="{'s': float(sys.argv[2])}")), "{out}", "{seconds}"]
    results = run_parts([Part("a", seconds, 10), Part("b", seconds, 20)], 100, tmp_path, progress=False)
    assert results[0].data["s"] == pytest.approx(80, abs=1)  # 100 s minus b's 20
    assert results[1].data["s"] == pytest.approx(100 - results[0].seconds, abs=1)
    lone = run_part(Part("c", seconds, 1), 7, tmp_path)
    assert lone.status == "ok" and lone.data["s"] == 7


# -- the CUDA-path checks: one row each, whatever another check does ------------------------------

FAKE_WORKER = """
import json, os, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
def write(event):
    with open(args["--results"], "a") as out:
        out.write(json.dumps(event) + "\\n")
for name in args["--names"].split(","):
    if name == "stuck":  # e.g. a CUDA initialisation that never returns
        time.sleep(60)
    write({"start": name})
    if name == "hangs":
        time.sleep(60)
    if name == "crashes":
        print("the device faulted", flush=True)
        os.abort()
    failed = name == "fails"
    write({"name": name, "outcome": "failed" if failed else "passed", "message": "loss is nan" if failed else "",
           "seconds": 0.1, "figures": {"x": 1}})
"""


def test_a_hanging_crashing_or_failing_check_is_its_own_row_and_the_others_run(tmp_path: Path) -> None:
    names = ["first", "hangs", "fails", "crashes", "stuck", "last"]
    rows = {r["name"]: r for r in run_checks(names, py(FAKE_WORKER), 30, 2, tmp_path)}
    assert list(rows) == names
    assert rows["first"]["outcome"] == "passed" and rows["first"]["figures"] == {"x": 1}
    assert rows["hangs"]["outcome"] == "failed" and rows["hangs"]["message"] == "timed out after 2 s"
    assert rows["fails"]["outcome"] == "failed" and rows["fails"]["message"] == "loss is nan"
    crashed = rows["crashes"]
    assert crashed["outcome"] == "failed" and crashed["message"].startswith("the worker died (killed by signal 6)")
    assert "the device faulted" in crashed["message"]
    assert rows["stuck"]["outcome"] == "failed" and rows["stuck"]["message"] == "timed out after 2 s, before it started"
    assert rows["last"]["outcome"] == "passed"  # in a fourth worker


def test_checks_stop_at_the_parts_time_and_the_rest_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_checks, "MIN_CHECK_S", 1.0)
    rows = run_checks(["hangs", "later"], py(FAKE_WORKER), 2, 60, tmp_path)
    assert [(r["name"], r["outcome"], r["message"]) for r in rows] == [
        ("hangs", "failed", "stopped: the part's time ran out"),
        ("later", "skipped", "skipped: out of time"),
    ]


def test_bench_measures_the_table_then_the_largest_batch_that_fits_then_compiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU plan's order, with stand-in measurements: batch 128 runs out of memory, 96 fits."""

    def measured(plan: Any, preset: str, batch: int, compiled: bool, seconds: float) -> dict[str, Any]:
        if batch == 128:
            return {"preset": preset, "batch_size": batch, "compiled": compiled, "error": "out of memory", "oom": True}
        return bench_row(preset, batch, compiled, 0.1, 1e12, 1e9, 0.3)

    monkeypatch.setattr(check_parts, "_bench_one", measured)
    seen: dict[str, Any] = {}
    check_parts.part_bench(gpu_plan(), tmp_path, 600, seen.update)  # an out-of-memory batch is no failure
    assert [(r["preset"], r["batch_size"], r["compiled"]) for r in seen["runs"]] == [
        ("clip-vit-s16", 32, False),
        ("harmony-vit-s16", 32, False),
        ("clip-vit-b16", 32, False),
        ("harmony-vit-b16", 32, False),
        ("harmony-vit-s16", 128, False),
        ("harmony-vit-s16", 96, False),
        ("clip-vit-s16", 96, False),
        ("clip-vit-b16", 32, True),
        ("harmony-vit-b16", 32, True),
        ("clip-vit-s16", 32, True),
        ("harmony-vit-s16", 32, True),
    ]


def test_the_plan_names_only_checks_of_the_list(tmp_path: Path) -> None:
    plan = cpu_plan()
    plan.test_checks = ("fused_adamw_matches_plain_adamw", "a_check_that_is_not_there")
    with pytest.raises(check_parts.PartFailed, match="do not exist: a_check_that_is_not_there"):
        check_parts.part_cuda_tests(plan, tmp_path, 60, {}.update)


# -- the report -----------------------------------------------------------------------------


def bench_row(
    preset: str, batch: int, compiled: bool, step: float, flops: float, mem: float, mfu: float
) -> dict[str, Any]:
    return {
        "preset": preset,
        "batch_size": batch,
        "compiled": compiled,
        "precision": "bfloat16",
        "step_time_s": step,
        "images_per_s": batch / step,
        "flops_per_step": flops,
        "peak_memory_bytes": mem,
        "achieved_tflops": flops / step / 1e12,
        "mfu": mfu,
    }


def test_targets_are_judged_against_the_figures() -> None:
    plan = gpu_plan()
    runs = [
        bench_row("clip-vit-s16", 32, False, 0.10, 1e12, 4e9, 0.30),
        bench_row("harmony-vit-s16", 32, False, 0.70, 6e12, 13e9, 0.28),  # 7x time for 6x FLOPs: 1.17 > 1.1
        bench_row("clip-vit-b16", 32, False, 0.20, 3e12, 8e9, 0.38),
        bench_row("clip-vit-b16", 32, True, 0.18, 3e12, 8e9, 0.42),  # compiled wins: best of the two
        bench_row("harmony-vit-b16", 32, False, 1.10, 18e12, 20e9, 0.33),
        {"preset": "harmony-vit-b16", "batch_size": 32, "compiled": True, "error": "RuntimeError: boom"},
    ]
    results = {
        "bench": PartResult("bench", "failed", 1.0, "boom", {"runs": runs}),
        "train": PartResult("train", "ok", 1.0, "", {"data_wait_share": 0.02}),
    }
    found = {t.name.split(" (")[0]: (t.figure, t.verdict) for t in targets(plan, results)}
    assert found["ViT-B/16 clip MFU >= 40%"] == ("42.0 %", "met")
    assert found["ViT-B/16 harmony MFU >= 35%"] == ("33.0 %", "NOT MET")
    assert found["harmony-vit-s16 / clip time ratio <= 1.1 x FLOP ratio"] == (
        "7.00x time vs 6.00x FLOPs = 1.17",
        "NOT MET",
    )
    assert found["harmony-vit-b16 / clip time ratio <= 1.1 x FLOP ratio"] == ("5.50x time vs 6.00x FLOPs = 0.92", "met")
    assert found["harmony-vit-s16 peak memory <= 3 x clip's"] == ("3.25x", "NOT MET")
    assert found["data wait <= 3 % of step time"] == ("2.0 %", "met")
    text = markdown(plan, [PartResult("env", "ok", 1.0, "", {"gpu": "NVIDIA H200", "peak_tflops": 989.0})], "cmd")
    assert "dense bf16 peak of 989.0 TFLOP/s" in text and "| ViT-B/16 clip MFU >= 40%" in text
    unknown = markdown(plan, [PartResult("env", "ok", 1.0, "", {"gpu": "Some GPU", "peak_tflops": None})], "cmd")
    assert "MFU omitted: this GPU's peak is not known" in unknown and "| not measured |" in unknown


def test_a_compiled_run_is_charged_the_eager_flops() -> None:
    eager = bench_row("harmony-vit-b16", 32, False, 1.0, 18e12, 20e9, 0.018)
    compiled = bench_row("harmony-vit-b16", 32, True, 0.5, 9e12, 20e9, 0.018)  # half the FLOPs seen
    check_parts.use_eager_flops(compiled, [eager, compiled])
    assert compiled["flops_per_step"] == 18e12 and compiled["flops_counted_when_compiled"] == 9e12
    assert compiled["achieved_tflops"] == pytest.approx(36.0) and compiled["mfu"] == pytest.approx(0.036)
    same = bench_row("clip-vit-b16", 32, True, 0.5, 3e12, 8e9, 0.006)
    check_parts.use_eager_flops(same, [bench_row("clip-vit-b16", 32, False, 0.6, 3e12, 8e9, 0.005), same])
    assert "flops_counted_when_compiled" not in same and same["mfu"] == 0.006


def record(step: int, **losses: float) -> dict[str, Any]:
    return {"step": step, "step_time_s": 0.1, "data_time_s": 0.01, "images_per_s": 10.0, **losses}


def test_training_summary_judges_each_term_and_distillation_by_its_kl() -> None:
    rising_ce = [
        record(
            i,
            loss=1.0,
            loss_mae=2.0 - 0.1 * i,
            loss_clip=1.0 + 0.1 * i,
            loss_text_distill=3.0 + 0.1 * i,
            text_distill_target_entropy=2.0 + 0.2 * i,
        )
        for i in range(8)
    ]
    terms = summarise_training(rising_ce)["terms"]
    assert terms["loss_mae"]["falling"] is True and terms["loss_clip"]["falling"] is False
    assert terms["loss_text_distill"]["falling"] is True  # the CE rises, its KL (1.0 - 0.1 i) falls
    assert terms["loss"]["falling"] is None
    assert summarise_training(rising_ce)["data_wait_share"] == pytest.approx(0.1)  # 0.01 s of 0.1 s
    rising_ce[5]["loss_mae"] = math.nan
    nan_term = summarise_training(rising_ce)["terms"]["loss_mae"]
    assert nan_term["finite"] is False and nan_term["falling"] is False
