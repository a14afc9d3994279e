"""The probes behind the CUDA-path checks (`harmony.check.device_checks`), written once for any device.

`harmony check gpu` runs them on a GPU (a small model), and the test suite runs the same list on a CPU
(the tiny-test model, `tests/test_cuda.py`), so no line here rots while no GPU is around. Each probe
raises `ProbeFailed` (an AssertionError: pytest shows it as a failed test) with a message that names
the figure and the bound, and returns its figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harmony.core.device import resolve_device
from harmony.core.distributed import DistInfo
from harmony.presets import build_config
from harmony.train.step import Stepper

# Fused attention kernels; the math fallback decomposes into bmm/softmax and shows none of them.
FUSED_SDPA = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
}
# Relative agreement of a low-precision loss with fp32 after a step or two: bf16 keeps 8 mantissa
# bits (2^-8 = 0.4 % per rounding), and a loss sums thousands of rounded products.
LOW_PRECISION_RTOL = {"bf16": 0.05, "fp16": 0.02}


class ProbeFailed(AssertionError):
    """A check found the device path wrong; the message says which figure missed which bound."""


def stepper_and_batch(
    preset: str, device: str, *overrides: str, batch_size: int = 4
) -> tuple[Stepper, dict[str, torch.Tensor]]:
    """A Stepper for `preset` on `device` and one real batch (the data views on built-in images)."""
    from harmony.train.bench import make_batch
    from harmony.train.loop import to_device

    cfg = build_config(preset, [f"train.batch_size={batch_size}", f"train.device={device}", *overrides])
    stepper = Stepper(cfg, resolve_device(device), DistInfo())
    stepper.set_span(steps_per_epoch=100, total_steps=1000)
    batch = make_batch(cfg, stepper.task, stepper.tokenizer, batch_size)
    return stepper, to_device(batch, stepper.device)


def loss_terms(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if k == "loss" or k.startswith("loss_")}


def run_steps(stepper: Stepper, batch: dict[str, torch.Tensor], steps: int) -> list[dict[str, float]]:
    """Loss terms of `steps` optimiser steps on the same batch (a fresh dict each time: steps may pop keys)."""
    return [loss_terms(stepper.train_step(dict(batch))) for _ in range(steps)]


class _OpDtypes(TorchDispatchMode):
    """Records the aten op names that run and the dtypes of matrix-product outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.matmul_dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        self.ops.add(name)
        if name in ("mm", "addmm", "bmm", "baddbmm") and isinstance(out, torch.Tensor):
            self.matmul_dtypes.add(out.dtype)
        return out


NEAR_ZERO = 0.5  # the scale a loss term near 0 is compared on


def _assert_close_terms(
    reference: list[dict[str, float]], other: list[dict[str, float]], rtol: float, what: str
) -> float:
    """Largest relative difference over every loss term and step; ProbeFailed above `rtol`. A term near 0 (a
    cosine loss such as SimSiam's starts there) is compared on the scale of NEAR_ZERO instead of its own value,
    whose relative rounding error would be unbounded."""
    worst = 0.0
    for step, (ref, got) in enumerate(zip(reference, other)):
        for term, value in ref.items():
            if not math.isfinite(got[term]):
                raise ProbeFailed(f"{what}: {term} at step {step + 1} is {got[term]} (reference {value:.5g})")
            rel = abs(got[term] - value) / max(abs(value), NEAR_ZERO)
            worst = max(worst, rel)
            if rel > rtol:
                raise ProbeFailed(
                    f"{what}: {term} at step {step + 1} is {got[term]:.5g} vs {value:.5g} "
                    f"(relative difference {rel:.3g} > {rtol})"
                )
    return worst


def precision_matches_fp32(preset: str, device: str, precision: str, steps: int = 2) -> dict[str, Any]:
    """`steps` training steps in `precision` (bf16 or fp16) from the same weights and batch as fp32:
    every loss term finite and within LOW_PRECISION_RTOL of fp32, the matrix products really in the low
    precision, and (fp16) the loss scaler on with a finite scale."""
    reference = run_steps(*stepper_and_batch(preset, device, "train.precision=fp32"), steps)
    stepper, batch = stepper_and_batch(preset, device, f"train.precision={precision}")
    with _OpDtypes() as seen:
        low = run_steps(stepper, batch, steps)
    wanted = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if wanted not in seen.matmul_dtypes:
        raise ProbeFailed(f"{preset} {precision}: no matrix product ran in {wanted} (saw {seen.matmul_dtypes})")
    worst = _assert_close_terms(reference, low, LOW_PRECISION_RTOL[precision], f"{preset} {precision} vs fp32")
    result: dict[str, Any] = {"preset": preset, "precision": precision, "max_rel_diff": worst, "loss": low[-1]}
    if precision == "fp16":
        if not stepper.scaler.is_enabled():
            raise ProbeFailed(f"{preset} fp16: the loss scaler is off")
        scale = float(stepper.scaler.get_scale())
        if not (math.isfinite(scale) and scale > 0):
            raise ProbeFailed(f"{preset} fp16: loss scale is {scale}")
        result["loss_scale"] = scale
    return result


def accumulation_matches_whole_batch(preset: str, device: str, precision: str, steps: int = 2) -> dict[str, Any]:
    """`train.accum_steps=2` (micro-batches of 2) against the whole batch of 4 at once, from the same weights
    and batch, in `precision`: every loss term within the precision's tolerance (exact in fp32)."""
    rtol = LOW_PRECISION_RTOL.get(precision, 1e-4)
    reference = run_steps(*stepper_and_batch(preset, device, f"train.precision={precision}"), steps)
    accumulated = run_steps(
        *stepper_and_batch(preset, device, f"train.precision={precision}", "train.accum_steps=2"), steps
    )
    worst = _assert_close_terms(reference, accumulated, rtol, f"{preset} {precision} accum_steps=2 vs 1")
    return {"preset": preset, "precision": precision, "max_rel_diff": worst}


def fused_adamw_matches_reference(preset: str, device: str) -> dict[str, Any]:
    """The training optimiser is fused AdamW, and one fused step gives the weights a plain (for-loop)
    AdamW step gives from the same gradients."""
    # a large step (lr 1 per 256 images, no warm-up) so the update stands far above fp32 rounding of the weights
    stepper, batch = stepper_and_batch(preset, device, "train.precision=fp32", "optim.lr=1", "optim.warmup_epochs=0")
    optimizer = stepper.optimizer
    if not optimizer.defaults.get("fused"):
        raise ProbeFailed(f"{preset}: the optimiser is not fused AdamW ({optimizer.defaults})")
    run_steps(stepper, batch, 1)  # gives the optimiser its moments
    reference_params = [p.detach().clone() for p in stepper.params]
    reference_state = copy.deepcopy(optimizer.state_dict())
    stepper.train_step(dict(batch))
    fused_after = [p.detach().clone() for p in stepper.params]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in stepper.params]
    # replay the same step with torch's single-tensor AdamW on copies of the weights
    copies = [torch.nn.Parameter(p.clone()) for p in reference_params]
    index = {id(p): i for i, p in enumerate(stepper.params)}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [copies[index[id(p)]] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    for group in groups:
        group.update(fused=False, foreach=False)
    plain = torch.optim.AdamW(groups)
    for state in reference_state["state"].values():
        state["step"] = state["step"].cpu()  # where a plain AdamW keeps its step count
    plain.load_state_dict(reference_state)
    for group, live in zip(plain.param_groups, optimizer.param_groups):
        group.update(lr=live["lr"], weight_decay=live["weight_decay"], fused=False, foreach=False)
    for copy_, grad in zip(copies, grads):
        copy_.grad = grad
    plain.step()
    # compare the updates, not the weights: an update is ~lr, far below any useful bound on weights
    moved = max(float((c.detach() - r).abs().max()) for c, r in zip(copies, reference_params))
    if moved == 0.0:
        raise ProbeFailed(f"{preset}: the AdamW step left every weight unchanged")
    worst = max(float((f - c.detach()).abs().max()) for f, c in zip(fused_after, copies)) / moved
    if worst > 1e-3:
        raise ProbeFailed(f"{preset}: fused AdamW's update differs from plain AdamW's by {worst:.3g} of it (> 1e-3)")
    return {"preset": preset, "max_rel_update_diff": worst, "max_update": moved}


def attention_kernels(preset: str, device: str, precision: str) -> dict[str, list[str]]:
    """The fused SDPA kernels each tower's forward runs (vision and text); ProbeFailed if a tower
    falls back to the unfused math path."""
    stepper, batch = stepper_and_batch(preset, device, f"train.precision={precision}")
    from harmony.models.normalize import normalize

    task, amp = stepper.task, stepper.amp_dtype
    images = normalize(batch["global"][0])
    towers = {"vision": lambda: task.student.visual(images)}
    if task.student.text is not None:
        towers["text"] = lambda: task.student.text(batch["text"])  # type: ignore[misc]
    found: dict[str, list[str]] = {}
    for name, forward in towers.items():
        with (
            torch.no_grad(),
            torch.autocast(stepper.device.type, dtype=amp or torch.float32, enabled=amp is not None),
            _OpDtypes() as seen,
        ):
            forward()
        found[name] = sorted({FUSED_SDPA[op] for op in seen.ops if op in FUSED_SDPA})
        if not found[name]:
            raise ProbeFailed(f"{preset} {name} tower: attention ran the unfused math path (no fused SDPA kernel)")
    return found


def compile_matches_eager(preset: str, device: str, steps: int = 3) -> dict[str, Any]:
    """`train.compile=true` trains to the same losses as eager (fp32) and keeps the eager parameter
    names, so EMA teachers, checkpoints and export see the same model."""
    eager_stepper, batch = stepper_and_batch(preset, device, "train.precision=fp32")
    eager = run_steps(eager_stepper, batch, steps)
    compiled_stepper, batch = stepper_and_batch(preset, device, "train.precision=fp32", "train.compile=true")
    compiled = run_steps(compiled_stepper, batch, steps)
    worst = _assert_close_terms(eager, compiled, 1e-3, f"{preset} compiled vs eager")
    names = set(compiled_stepper.task.state_dict())
    if names != set(eager_stepper.task.state_dict()):
        odd = sorted(names ^ set(eager_stepper.task.state_dict()))[:3]
        raise ProbeFailed(f"{preset}: compiling renames the model's state (e.g. {odd})")
    return {"preset": preset, "max_rel_diff": worst, "loss": compiled[-1]}


def nonfinite_step_is_skipped(preset: str, device: str) -> dict[str, Any]:
    """A NaN loss skips the update on the device: weights and optimiser moments untouched, the skip counted."""
    stepper, batch = stepper_and_batch(preset, device, "train.precision=fp32")
    run_steps(stepper, batch, 1)
    before = [p.detach().clone() for p in stepper.params]
    moments = [s["exp_avg"].clone() for s in stepper.optimizer.state.values()]
    model = stepper.model

    def poisoned(method: Any, *args: Any) -> Any:  # the whole step's pass (K = 1), its loss made NaN
        whole = model(method, *args)
        return whole._replace(loss=whole.loss * float("nan"))

    stepper.model = poisoned  # type: ignore[assignment]
    stepper.train_step(dict(batch))
    stepper.model = model
    if int(stepper.bad_steps) != 1 or int(stepper.bad_in_a_row) != 1:
        raise ProbeFailed(f"{preset}: a NaN step was counted {int(stepper.bad_steps)} time(s), not once")
    for p, b in zip(stepper.params, before):
        if not torch.equal(p.detach(), b):
            raise ProbeFailed(f"{preset}: a NaN step changed the weights")
    for state, m in zip(stepper.optimizer.state.values(), moments):
        if not torch.equal(state["exp_avg"], m):
            raise ProbeFailed(f"{preset}: a NaN step changed AdamW's moments")
    after = run_steps(stepper, batch, 1)[0]
    if not math.isfinite(after["loss"]) or int(stepper.bad_in_a_row) != 0:
        raise ProbeFailed(f"{preset}: the step after a skipped one is not clean (loss {after['loss']})")
    return {"preset": preset, "bad_steps": int(stepper.bad_steps)}


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def resume_and_export(preset: str, device: str, folder: Path) -> dict[str, Any]:
    """Train 4 steps on `device` with a checkpoint at step 2; resuming from it gives the same losses
    for steps 3-4 (drop-path draws from the device RNG, so a lost RNG state shows); then
    `harmony export` of the device checkpoint gives timm weights with the model's features."""
    from harmony.export.cli import cmd_export
    from harmony.loading import load
    from harmony.train.loop import train

    overrides = [
        f"train.device={device}",
        "train.max_steps=4",
        "train.log_every=1",
        "train.save_every=2",
        "train.keep_last=5",
        "model.drop_path_rate=0.2",
        "data.num_workers=0",
    ]
    full, resumed = folder / "full", folder / "resumed"
    train(build_config(preset, overrides), full, progress=False)
    train(
        build_config(preset, overrides), resumed, resume=str(full / "checkpoints" / "step_00000002.pt"), progress=False
    )
    a, b = _losses(full), _losses(resumed)
    if sorted(b) != [3, 4]:
        raise ProbeFailed(f"{preset}: the resumed run logged steps {sorted(b)}, not [3, 4]")
    for step in b:
        if not math.isclose(a[step], b[step], rel_tol=1e-4, abs_tol=1e-5):
            raise ProbeFailed(f"{preset}: resumed loss at step {step} is {b[step]:.6g}, uninterrupted {a[step]:.6g}")
    out = folder / "vit.safetensors"
    args = argparse.Namespace(checkpoint=str(full), format="timm", out=str(out), weights="auto")
    cmd_export(args)
    import timm

    recipe = json.loads(out.with_suffix(".json").read_text())
    call = dict(recipe["create_model"])
    vit: torch.nn.Module = timm.create_model(call.pop("model_name"), **call)  # the recipe names the file
    ours = load(full).model.visual
    size = int(recipe["pretrained_cfg"]["input_size"][-1])
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = vit.eval().forward_features(images)  # type: ignore[operator]
        diff = float((features - ours(images)).abs().max())
    if diff > 1e-4:
        raise ProbeFailed(f"{preset}: the exported timm model's features differ from the checkpoint's by {diff:.3g}")
    return {"preset": preset, "resumed_losses": b, "export_max_diff": diff}
