"""`data.device_augment` on device=cpu: the workers ship bytes + the worker path's own crop plans, masks and
captions; the main process's decode + crops + colour ops agree with the worker path's OpenCV rendering within
the stated tolerances; unreadable images are skipped exactly as before; training and exact resume work."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from harmony.config import AugmentConfig, ConfigError
from harmony.core.distributed import DistInfo
from harmony.data.augment import CropPlan, plan_global, plan_local, render_crop
from harmony.data.decode import open_image
from harmony.data.device_augment import (
    DeviceAugment,
    PlanMaker,
    decode_plan,
    device_augment_enabled,
    encode_plan,
    jpeg_bytes,
)
from harmony.data.device_color import FLIP, GRAY, JITTER, SIGMA, SOLARIZE, photometric
from harmony.data.errors import SKIP_REASONS, SampleError
from harmony.data.loader import build_train_data
from harmony.data.shapes import ShapesDataset
from harmony.data.views import collate, view_maker_for
from harmony.train.loop import train
from tests.conftest import Cli, tiny
from tests.test_data_sources import broken_shards
from tests.test_train import losses

CPU = torch.device("cpu")
NO_COLOUR = ["data.augment.color_jitter=0", "data.augment.grayscale=0", "data.augment.global_blur=0,0"]
NO_COLOUR += ["data.augment.global_solarize=0,0", "data.augment.local_blur=0"]


def scene(seed: int, width: int = 120, height: int = 90) -> np.ndarray:
    """A smooth, left-right asymmetric RGB picture: colour gradients plus soft-edged blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255 * rng.random(), y / height * 255 * rng.random(), (x + y) / 2], -1)
    for _ in range(4):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(8, 30)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    return cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (0, 0), 1.5)


def encode(pixels: np.ndarray, fmt: str = "JPEG", **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def both_paths(overrides: list[str], images: list[bytes]) -> tuple[dict, dict]:
    """(worker-path batch, device-path batch rendered on the CPU) of the same images and seeds."""
    maker = view_maker_for(tiny("harmony-tiny-test", *overrides))
    worker = collate([maker(open_image(d, 1 << 30), "a red circle", 7 + i) for i, d in enumerate(images)])
    shipped = collate([PlanMaker(maker)(open_image(d, 1 << 30), "a red circle", 7 + i) for i, d in enumerate(images)])
    return worker, DeviceAugment(maker, CPU)(shipped)


def seeded(seed: int) -> random.Random:
    """The crop-plan RNG as ViewMaker leaves it after seeding the sample's torch generator."""
    rng = random.Random(seed)
    rng.getrandbits(62)
    return rng


def test_workers_ship_the_worker_paths_plans_masks_and_captions() -> None:
    maker = view_maker_for(tiny("harmony-tiny-test"))
    for seed in range(20):
        data = encode(scene(seed))
        view = maker(open_image(data, 1 << 30), "two blue squares", seed)
        shipped = PlanMaker(maker)(open_image(data, 1 << 30), "two blue squares", seed)
        glob, local = maker.plans(120, 90, seeded(seed))
        assert [decode_plan(r, 32) for r in shipped["global_plan"]] == glob
        assert [decode_plan(r, 16) for r in shipped["local_plan"]] == local
        assert bytes(shipped["payload"].numpy()) == data  # the file as is: no pixel decoded in the worker
        for key in view.keys() - {"global", "local"}:
            assert torch.equal(view[key], shipped[key]), key


def test_device_crops_are_the_worker_crops_within_interpolation_tolerance() -> None:
    """Same boxes and flips; only the resampling differs (worker: draft-scale JPEG decode, pyrDown + bicubic;
    device: full decode, roi_align area sampling): on smooth pictures the mean difference is under 2 levels of
    255 and under 4 for every single crop (on 16-32 px crops), below what a one-pixel shift of the box costs
    (5-7); a mirrored crop is off by 40+."""
    images = [encode(scene(s), quality=95) for s in range(8)]
    worker, device = both_paths(NO_COLOUR, images)
    for key in ("global", "local"):
        a, b = worker[key].float(), device[key].float()
        assert a.shape == b.shape and device[key].dtype == torch.uint8
        per_crop = (a - b).abs().mean((2, 3, 4))
        assert per_crop.mean() < 2.0 and per_crop.max() < 4.0, per_crop
        assert (a[..., 1:] - b[..., :-1]).abs().mean() > 2 * per_crop.mean()
        assert (a - b.flip(-1)).abs().mean() > 10 * per_crop.mean()


def fields(plan: CropPlan) -> tuple:
    """A plan's photometric fields (flip included), for applying them to a ready crop."""
    return plan.flip, plan.jitter, plan.grayscale, plan.blur_sigma, plan.solarize


def test_colour_ops_on_tensors_match_opencv() -> None:
    """Brightness, contrast, saturation, grayscale, blur, solarise, flip: within 1 level (rounding of the
    same formula); hue within 8 levels, mean under 1 (OpenCV converts through 8-bit HSV: H in 256 steps)."""
    crop = cv2.resize(scene(3, 200, 160), (64, 64), interpolation=cv2.INTER_AREA)
    box = (0, 0, 64, 64)
    cases = [
        *(CropPlan(box, 64, jitter=((op, f),)) for op in (0, 1, 2) for f in (0.6, 0.85, 1.3)),
        CropPlan(box, 64, flip=True),
        CropPlan(box, 64, grayscale=True),
        *(CropPlan(box, 64, blur_sigma=s) for s in (0.1, 0.7, 1.4, 2.0)),
        CropPlan(box, 64, solarize=True),
    ]
    hue = [CropPlan(box, 64, jitter=((3, f),)) for f in (-0.1, -0.03, 0.05, 0.1)]
    rng = random.Random(0)
    drawn = [plan_global(64, 64, i % 2, AugmentConfig(global_size=64), rng) for i in range(12)]
    x = torch.from_numpy(crop).permute(2, 0, 1).float()
    for plans, worst, mean in ((cases, 1, 0.05), (hue, 8, 1.0), (drawn, 8, 1.0)):
        ready = [CropPlan(box, 64, *fields(p)) for p in plans]
        table = torch.tensor([encode_plan(p) for p in ready], dtype=torch.float64)
        out = photometric(x.expand(len(ready), -1, -1, -1).clone(), table)
        for plan, got in zip(ready, out):
            want = torch.from_numpy(render_crop(crop, plan)).permute(2, 0, 1).float()
            diff = (want - got).abs()
            assert diff.max() <= worst and diff.mean() <= mean, (plan, diff.max(), diff.mean())


def reference_boxes(scale: tuple[float, float], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Area fractions and log aspect ratios of `n` torchvision RandomResizedCrop boxes on a 500x400 image."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    image = torch.zeros(3, 400, 500)
    boxes = torch.tensor([RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])
    return (boxes[:, 2] * boxes[:, 3] / (400 * 500)).double(), (boxes[:, 3] / boxes[:, 2]).double().log()


def test_ten_thousand_drawn_parameters_follow_the_recipe() -> None:
    """The augmentation recipe of docs/design.md ("Data path"): global scale (0.32, 1) (boxes distributed as
    torchvision's RandomResizedCrop), flip, jitter p 0.8 (0.4, 0.4, 0.2, 0.1), grayscale p 0.2, blur p 1.0 / 0.1
    with sigma U(0.1, 2), solarise p 0.2 on crop 2; local 96 px scale (0.05, 0.32), blur p 0.5 -- read back from
    the plan tables the device receives."""
    cfg, rng, n = AugmentConfig(), random.Random(1), 10_000
    tables = {
        "g0": torch.tensor([encode_plan(plan_global(400, 500, 0, cfg, rng)) for _ in range(n)]),
        "g1": torch.tensor([encode_plan(plan_global(400, 500, 1, cfg, rng)) for _ in range(n)]),
        "local": torch.tensor([encode_plan(plan_local(400, 500, cfg, rng)) for _ in range(n)]),
    }
    tol = 4 * math.sqrt(0.25 / n)  # four standard errors of a rate
    for name, blur, solarize, scale, size in [
        ("g0", 1.0, 0.0, (0.32, 1.0), 224),
        ("g1", 0.1, 0.2, (0.32, 1.0), 224),
        ("local", 0.5, 0.0, (0.05, 0.32), 96),
    ]:
        t = tables[name].double()
        area, log_ratio = t[:, 2] * t[:, 3] / (400 * 500), (t[:, 3] / t[:, 2]).log()
        assert area.min() >= scale[0] * 0.97 and area.max() <= scale[1] * 1.03
        assert log_ratio.abs().max() < math.log(4 / 3) + 0.05
        ref_area, ref_ratio = reference_boxes(scale, n)  # torchvision's RandomResizedCrop on the same image
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):
            assert abs(area.quantile(q) - ref_area.quantile(q)) < 0.02, (name, q)
            assert abs(log_ratio.quantile(q) - ref_ratio.quantile(q)) < 0.03, (name, q)
        jittered = t[:, JITTER] >= 0
        for column, p in [(FLIP, 0.5), (GRAY, 0.2), (SOLARIZE, solarize)]:
            assert abs((t[:, column] > 0).double().mean() - p) < tol, (name, column)
        assert abs(jittered.double().mean() - 0.8) < tol
        assert abs((t[:, SIGMA] > 0).double().mean() - blur) < tol
        sigma = t[t[:, SIGMA] > 0, SIGMA] * 224 / size
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.06
        pairs = t[jittered][:, JITTER : JITTER + 8].reshape(-1, 4, 2)
        for op, low, high in [(0, 0.6, 1.4), (1, 0.6, 1.4), (2, 0.8, 1.2), (3, -0.1, 0.1)]:
            factors = pairs[..., 1][pairs[..., 0] == op]
            assert len(factors) == jittered.sum()  # every op once per jittered crop
            assert factors.min() >= low and factors.max() <= high and abs(factors.mean() - (low + high) / 2) < 0.01
            assert abs((pairs[:, 0, 0] == op).double().mean() - 0.25) < tol  # a uniformly random order


def cmyk_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(buffer, format="JPEG")
    return buffer.getvalue()


def test_images_the_device_does_not_take_are_decoded_as_the_worker_path_does() -> None:
    """Transparent PNG (composited on white), EXIF-rotated and CMYK JPEGs go to the worker's decoder and give
    the worker path's crops; a grey JPEG goes to the device; a truncated JPEG is a SampleError as before."""
    pixels = scene(5)
    alpha = np.where(np.arange(120) < 60, 0, 255).astype(np.uint8)[None].repeat(90, 0)
    hidden = pixels.copy()
    hidden[:, :60] = 0  # black under the transparent half: dropping alpha would show it
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {
        "png": encode(np.dstack([hidden, alpha]), "PNG"),
        "rotated": encode(pixels, exif=exif.tobytes()),
        "cmyk": cmyk_jpeg(pixels),
        "grey": encode(pixels[..., 0], quality=95),
    }
    taken = [jpeg_bytes(open_image(d, 1 << 30)) is not None for d in cases.values()]
    assert taken == [False, False, False, True]
    worker, device = both_paths(NO_COLOUR, list(cases.values()))
    for key in ("global", "local"):
        per_image = (worker[key].float() - device[key].float()).abs().mean((0, 2, 3, 4))
        assert per_image.max() < 2.0, per_image  # the same pixels; only the resampling differs
    assert (device["global"][:, 0] == 255).float().mean() > 0.1  # the transparent half became white
    truncated = encode(pixels)[:800]
    maker = view_maker_for(tiny("harmony-tiny-test"))
    with pytest.raises(SampleError, match="unreadable"):
        maker(open_image(truncated, 1 << 30), "x", 0)
    with pytest.raises(SampleError, match="unreadable"):
        PlanMaker(maker)(open_image(truncated, 1 << 30), "x", 0)


def test_loader_skips_and_counts_the_same_samples_on_both_paths(tmp_path: Path) -> None:
    usable, skips = broken_shards(tmp_path / "shards")
    batches = {}
    for flag in ("false", "true"):
        cfg = tiny(
            "clip-tiny-test",
            f"data_spec={tmp_path / 'shards'}",
            "data.pin_memory=false",
            "data.shuffle_buffer=0",
            f"data.device_augment={flag}",
            f"data.epoch_size={len(usable)}",
        )
        cfg.train.batch_size = 1  # one sample a batch: the loader alone, no contrast to refuse it
        data = build_train_data(cfg, view_maker_for(cfg), DistInfo(), CPU)
        assert isinstance(data.maker, PlanMaker) == (flag == "true")
        batches[flag] = list(data.batches(0))
        assert data.skipped == skips, flag
    assert len(batches["true"]) == len(usable)
    for a, b in zip(batches["false"], batches["true"], strict=True):
        assert torch.equal(a["text"], b["text"]) and torch.equal(a["data_errors"], b["data_errors"])
        assert a["global"].shape == b["global"].shape and b["global"].dtype == torch.uint8
        # flat saturated colours: OpenCV's 8-bit HSV hue is 4-6 levels off the exact rotation (which the device
        # path matches), and a later brightness factor scales that up
        assert (a["global"].float() - b["global"].float()).abs().mean() < 6


def test_a_jpeg_no_decoder_reads_is_replaced_by_another_sample_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device decoder refuses sample 1: the CPU decodes it (same crops, nothing counted). When the CPU
    decoder refuses it too, the batch keeps its size, sample 1 becomes a copy of a readable sample (crops,
    caption, masks together), its flat indices are rebuilt, and one unreadable image is counted."""
    import harmony.data.device_augment as dev

    maker = view_maker_for(tiny("harmony-tiny-test"))
    images = [encode(scene(s)) for s in range(3)]
    shipped = [PlanMaker(maker)(open_image(d, 1 << 30), f"caption number {i}", i) for i, d in enumerate(images)]
    batch = {**collate(shipped), "data_errors": torch.zeros(len(SKIP_REASONS), dtype=torch.long)}
    normal = DeviceAugment(maker, CPU)(batch)
    real_decode, refused = dev.decode_jpeg, len(images[1])

    def device_decode(data: torch.Tensor | list[torch.Tensor], **kwargs: object) -> object:
        if isinstance(data, list):
            return [device_decode(d, **kwargs) for d in data]
        if len(data) == refused:
            raise RuntimeError("the device decoder refuses this one")
        return real_decode(data, **kwargs)

    monkeypatch.setattr(dev, "decode_jpeg", device_decode)
    fallback = DeviceAugment(maker, CPU)(batch)
    assert fallback["data_errors"].tolist() == [0, 0, 0]
    for key in ("global", "local", "text"):
        assert torch.equal(fallback[key], normal[key]), key

    def cpu_decode(data: torch.Tensor, background: object) -> torch.Tensor:
        raise SampleError("image", "image data unreadable (OSError: broken data stream)")

    monkeypatch.setattr(dev, "_cpu_decode", cpu_decode)
    out = DeviceAugment(maker, CPU)(batch)
    assert out["data_errors"].tolist() == [1, 0, 0] and out["global"].shape[1] == 3
    for key in ("global", "local", "ibot_mask", "mae_keep"):
        assert torch.equal(out[key][:, 1], out[key][:, 0]) and torch.equal(out[key][:, 2], normal[key][:, 2]), key
    assert torch.equal(out["text"][1], out["text"][0]) and not torch.equal(out["text"][1], normal["text"][1])
    rebuilt = collate(
        [
            {"text": t, "text_real": r, "text_mask": m}
            for t, r, m in zip(out["text"], out["text_real"], out["text_mask"])
        ]
    )
    for key in ("text_real_index", "mlm_index", "mlm_in_real", "text_distill_weight"):
        assert torch.equal(out[key], rebuilt[key]), key


def jpeg_csv(folder: Path, count: int = 64) -> Path:
    """`builtin:shapes` pictures (64 px) as real JPEG files + a CSV of their captions."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = ShapesDataset("train", count, 64, 0, 0.0)
    lines = ["filepath,caption"]
    for i in range(count):
        sample = shapes[i]
        path = folder / f"{i:03d}.jpg"
        sample.image.convert("RGB").save(path, quality=95)
        lines.append(f"{path},{sample.caption}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def records(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def falls(curve: list[float]) -> bool:
    return sum(curve[-4:]) < sum(curve[:4])


@pytest.mark.parametrize("preset", ["clip-tiny-test", "harmony-tiny-test"])
def test_training_on_the_device_path_gives_finite_falling_losses(tmp_path: Path, preset: str) -> None:
    """16 steps on real JPEGs: finite losses; CLIP, MAE and MLM terms fall (iBOT and text distillation chase
    moving teachers); for Harmony the total tracks the worker path's run step by step within 2 %."""
    spec = jpeg_csv(tmp_path / "jpegs")
    overrides = [f"data_spec={spec}", "train.max_steps=16", "train.log_every=1", "optim.lr=0.01"]
    overrides += ["optim.warmup_epochs=0", "train.epochs=2"]
    result = train(tiny(preset, *overrides, "data.device_augment=true"), tmp_path / "device", progress=False)
    device = records(tmp_path / "device")
    assert len(device) == 16 and all(math.isfinite(r["loss"]) for r in device)
    assert "nothing skipped" in result.data_summary
    for term in ("loss_clip", "loss_mae", "loss_mlm"):
        if term in device[0]:
            assert falls([r[term] for r in device]), (term, [r[term] for r in device])
    if preset == "harmony-tiny-test":
        train(tiny(preset, *overrides, "data.device_augment=false"), tmp_path / "worker", progress=False)
        for a, b in zip(records(tmp_path / "worker"), device, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=0.02), a["step"]


def test_resume_on_the_device_path_is_exact(tmp_path: Path) -> None:
    """The parameter draw is a function of (train.seed, epoch, sample id), so the step and config in the
    checkpoint replay it: a run resumed at step 3 continues with the same losses and ends with the same weights."""
    from harmony.core import checkpoint as ckpt

    spec = jpeg_csv(tmp_path / "jpegs", 32)
    overrides = [f"data_spec={spec}", "data.device_augment=true", "train.max_steps=6", "train.log_every=1"]
    overrides += ["train.save_every=3", "train.keep_last=5", "train.epochs=2"]
    train(tiny("harmony-tiny-test", *overrides), tmp_path / "full", progress=False)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    name = "step_00000003.pt"
    (resumed / "checkpoints" / name).write_bytes((tmp_path / "full" / "checkpoints" / name).read_bytes())
    train(tiny("harmony-tiny-test", *overrides), resumed, resume="auto", progress=False)
    a, b = losses(tmp_path / "full"), losses(resumed)
    assert sorted(b) == [4, 5, 6] and all(b[s] == pytest.approx(a[s], rel=1e-6) for s in b)
    torch.testing.assert_close(
        ckpt.load(tmp_path / "full" / "checkpoints" / "last.pt")["model"],
        ckpt.load(resumed / "checkpoints" / "last.pt")["model"],
    )


def test_device_augment_setting() -> None:
    assert device_augment_enabled("auto", "cuda") and not device_augment_enabled("auto", "cpu")
    assert device_augment_enabled("true", "cpu") and not device_augment_enabled("false", "cuda")
    with pytest.raises(ConfigError, match=r"data\.device_augment"):
        tiny("clip-tiny-test", "data.device_augment=sometimes")
    cfg = tiny("clip-tiny-test")
    assert not isinstance(build_train_data(cfg, view_maker_for(cfg), DistInfo(), CPU).maker, PlanMaker)


def test_bench_data_reports_both_paths(tmp_path: Path, cli: Cli) -> None:
    spec = jpeg_csv(tmp_path / "jpegs", 16)
    out = tmp_path / "bench.json"
    args = ["--preset", "harmony-tiny-test", "--data", str(spec), "--workers", "0", "--batches", "1"]
    proc = cli("bench", "data", *args, "--batch-size", "4", "--profile", "16", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "worker path" in proc.stdout and "device_augment path" in proc.stdout and "on cpu:" in proc.stdout
    figures = json.loads(out.read_text())
    assert set(figures["device_augment_ms_per_image"]) == {"read", "ship", "masks", "text", "collate"}
    assert {"decode", "crops"} <= set(figures["profile_ms_per_image"])
    assert figures["device_images_per_s"]["images_per_s"] > 0
    bad = cli("bench", "data", "--preset", "clip-tiny-test", "--device", "tpu", "--profile", "4")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--device" in bad.stderr


def test_a_real_jpeg_no_decoder_reads_costs_one_counted_skip_on_both_paths(tmp_path: Path) -> None:
    """A JPEG whose header parses and which ends in an end marker but whose scan header is zeroed: the worker
    path skips it and takes the row at its place in the other global batch; the device path ships it, both
    decoders refuse it, and it is replaced by a copy; either way it is counted once and batches keep their size."""
    spec = jpeg_csv(tmp_path / "jpegs", 16)
    broken = bytearray((tmp_path / "jpegs" / "003.jpg").read_bytes())
    broken[600:700] = bytes(100)
    (tmp_path / "jpegs" / "003.jpg").write_bytes(bytes(broken))
    assert jpeg_bytes(open_image(bytes(broken), 1 << 30)) is not None
    for flag in ("false", "true"):
        cfg = tiny("clip-tiny-test", f"data_spec={spec}", "train.batch_size=8", f"data.device_augment={flag}")
        data = build_train_data(cfg, view_maker_for(cfg), DistInfo(), CPU)
        batches = list(data.batches(0))
        assert data.skipped["image"] == 1 == sum(int(b["data_errors"].sum()) for b in batches), flag
        assert all(b["global"].shape[1] == 8 and b["text"].shape[0] == 8 for b in batches) and len(batches) == 2
