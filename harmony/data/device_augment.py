"""`data.device_augment`: loader workers ship image bytes + crop plans; the main process decodes and crops on
the device.

Worker side (`PlanMaker`): the same per-sample `random.Random(seed)` draws the same crop plans, iBOT/MAE masks
and masked captions as `ViewMaker`, but instead of decoding and rendering it ships the JPEG bytes and a plan
table (one row per crop, `device_color.PLAN_COLUMNS`). Images the device decoder should not get (not JPEG,
CMYK, EXIF-rotated, no end-of-image marker = truncated) are decoded in the worker exactly as the worker path
does (draft scale, transparency composited, EXIF applied; unreadable ones skipped and counted as today) and
shipped as pixels.

Device side (`DeviceAugment`): batched `torchvision.io.decode_jpeg` on the device, `roi_align` crops (adaptive
sampling, i.e. area-averaged when shrinking), then the photometric ops of `device_color`. A JPEG the device
decoder refuses is decoded on the CPU as the worker path would; one that no decoder reads is replaced by a copy
of another sample of the batch (image, caption and masks together, so batches keep their size on every rank)
and counted as an unreadable image. `prefetched` renders batch k+1 on a side CUDA stream while step k runs.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from harmony.config import ConfigError
from harmony.data.augment import CropPlan
from harmony.data.decode import DEFAULT_MAX_PIXELS, decode_pixels, open_image, orientation, upright_size
from harmony.data.device_color import FLIP, GRAY, JITTER, PLAN_COLUMNS, SIGMA, SOLARIZE, photometric
from harmony.data.errors import BATCH_COUNTS, SKIP_REASONS, SampleError
from harmony.data.views import CROP_MAJOR, DERIVED, ViewMaker, add_indices

KIND_JPEG, KIND_PIXELS = 0, 1
DEVICE_JPEG_MODES = ("RGB", "L")


def device_augment_enabled(setting: object, device: torch.device | str) -> bool:
    """`data.device_augment`: true/false, or auto = on for CUDA devices, off otherwise."""
    text = str(setting).strip().lower()
    if text not in ("auto", "true", "false"):
        raise ConfigError(f"config key 'data.device_augment' must be auto, true or false, got {setting!r}")
    return torch.device(device).type == "cuda" if text == "auto" else text == "true"


def encode_plan(plan: CropPlan) -> list[float]:
    """One crop plan as a row of the plan table (box, flip, 4 x (jitter op, factor), gray, sigma, solarise)."""
    jitter = [v for op, f in plan.jitter for v in (float(op), f)] + [-1.0, 0.0] * (4 - len(plan.jitter))
    return [
        *map(float, plan.box),
        float(plan.flip),
        *jitter,
        float(plan.grayscale),
        plan.blur_sigma,
        float(plan.solarize),
    ]


def decode_plan(row: torch.Tensor, size: int) -> CropPlan:
    """The `CropPlan` a plan-table row encodes (inverse of `encode_plan`)."""
    v = row.tolist()
    jitter = tuple((int(v[i]), v[i + 1]) for i in range(JITTER, JITTER + 8, 2) if v[i] >= 0)
    box = (int(v[0]), int(v[1]), int(v[2]), int(v[3]))
    return CropPlan(box, size, v[FLIP] > 0, jitter, v[GRAY] > 0, v[SIGMA], v[SOLARIZE] > 0)


def jpeg_bytes(image: Image.Image) -> bytes | None:
    """The file bytes of a lazily opened JPEG the device decoder can take as is (RGB or grey, upright, ending
    in an end-of-image marker); None for anything else, which the worker decodes itself."""
    fp = getattr(image, "fp", None)
    if image.format != "JPEG" or image.mode not in DEVICE_JPEG_MODES or not isinstance(fp, io.BytesIO):
        return None
    data = fp.getvalue()
    if b"\xff\xd9" not in data[-64:] or orientation(image) != 1:
        return None
    return data


class PlanMaker:
    """Worker-side replacement of `ViewMaker` for the device path: same RNG use, bytes instead of crops."""

    def __init__(self, maker: ViewMaker) -> None:
        self.maker = maker

    def __call__(self, image: Image.Image, caption: str, seed: int) -> dict[str, torch.Tensor]:
        maker = self.maker
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        width, height = upright_size(image)
        glob, local = maker.plans(width, height, rng)
        out = self.payload(image, glob + local)
        out.update(self.tables(glob, local))
        out.update(maker.masks(rng, gen))
        out.update(maker.text(caption, gen))
        return out

    @staticmethod
    def tables(glob: list[CropPlan], local: list[CropPlan]) -> dict[str, torch.Tensor]:
        """The plan tables [G, PLAN_COLUMNS] and (when there are local crops) [L, PLAN_COLUMNS]."""
        out = {"global_plan": torch.tensor([encode_plan(p) for p in glob], dtype=torch.float64)}
        if local:
            out["local_plan"] = torch.tensor([encode_plan(p) for p in local], dtype=torch.float64)
        return out

    def payload(self, image: Image.Image, plans: list[CropPlan]) -> dict[str, torch.Tensor]:
        """JPEG bytes, or (fallback) the worker path's decoded pixels; `source` = kind, H, W, y/x scale."""
        data = jpeg_bytes(image)
        if data is not None:
            width, height = image.size
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            source = [KIND_JPEG, height, width, 1.0, 1.0]
        else:
            pixels, (fy, fx) = decode_pixels(image, plans, self.maker.background)
            payload = torch.from_numpy(np.require(pixels, requirements=["C", "W"]).reshape(-1))
            source = [KIND_PIXELS, pixels.shape[0], pixels.shape[1], fy, fx]
        return {"payload": payload, "source": torch.tensor(source, dtype=torch.float64)}


def _cpu_decode(data: torch.Tensor, background: tuple[int, int, int]) -> torch.Tensor:
    """The worker path's full-scale decode of one JPEG the device decoder refuses; raises SampleError."""
    image = open_image(data.numpy().tobytes(), DEFAULT_MAX_PIXELS * 4)  # the worker checked the size
    pixels, _ = decode_pixels(image, [], background)
    return torch.from_numpy(np.require(pixels, requirements=["C", "W"])).permute(2, 0, 1)


class DeviceAugment:
    """Turns a batch of bytes + plans (from `PlanMaker` via `collate`) into the worker path's batch, with
    uint8 crops [G, B, 3, S, S] on `device`; the batch's counts (`BATCH_COUNTS`) stay on the host."""

    def __init__(self, maker: ViewMaker, device: torch.device) -> None:
        self.aug, self.background, self.device = maker.aug, maker.background, device

    def images(self, batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, float, float] | None]:
        """Per sample: uint8 [3, H, W] on the device and its (y, x) scale to plan coordinates; None: unreadable."""
        offsets, sources = batch["payload_offsets"].tolist(), batch["source"].tolist()
        chunks = [batch["payload"][offsets[i] : offsets[i + 1]] for i in range(len(sources))]
        out: list[tuple[torch.Tensor, float, float] | None] = [None] * len(sources)
        jpegs = [i for i, s in enumerate(sources) if s[0] == KIND_JPEG]
        decoded = self._decode([chunks[i] for i in jpegs])
        for i, pixels in zip(jpegs, decoded):
            if pixels is None:
                try:
                    pixels = _cpu_decode(chunks[i], self.background).to(self.device, non_blocking=True)
                except SampleError:
                    continue
            out[i] = (pixels, 1.0, 1.0)
        for i, (kind, h, w, fy, fx) in enumerate(sources):
            if kind == KIND_PIXELS:
                hwc = chunks[i].view(int(h), int(w), 3).to(self.device, non_blocking=True)
                out[i] = (hwc.permute(2, 0, 1), fy, fx)
        return out

    def _decode(self, chunks: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Batched device decode; on failure one by one, None for each JPEG the device decoder refuses."""
        if not chunks:
            return []
        try:
            return list(decode_jpeg(chunks, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for chunk in chunks:
                try:
                    out.append(decode_jpeg(chunk, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def crops(self, images: list[tuple[torch.Tensor, float, float]], plans: torch.Tensor, size: int) -> torch.Tensor:
        """Crop-major uint8 [C, B, 3, size, size] of plan table `plans` [C, B, PLAN_COLUMNS]."""
        count, batch = plans.shape[:2]
        out = torch.empty(count, batch, 3, size, size, device=self.device)
        for b, (pixels, fy, fx) in enumerate(images):
            top, left, h, w = plans[:, b, :4].T
            boxes = torch.stack([torch.zeros(count), left * fx, top * fy, (left + w) * fx, (top + h) * fy], 1)
            image = pixels.unsqueeze(0).float()
            rois = boxes.to(device=self.device, dtype=torch.float32, non_blocking=True)
            out[:, b] = roi_align(image, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flat = photometric(
            out.view(count * batch, 3, size, size).round_().clamp_(0, 255), plans.reshape(-1, PLAN_COLUMNS)
        )
        return flat.to(torch.uint8).view(count, batch, 3, size, size)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = self.images(batch)
        unreadable = [i for i, image in enumerate(images) if image is None]
        if unreadable:
            batch = replace_samples(batch, unreadable, images)
        host = {"payload", "payload_offsets", "source", "global_plan", "local_plan", *BATCH_COUNTS}
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k not in host}
        ready = [image for image in images if image is not None]
        out["global"] = self.crops(ready, batch["global_plan"], self.aug.global_size)
        if "local_plan" in batch:
            out["local"] = self.crops(ready, batch["local_plan"], self.aug.local_size)
        out |= {key: batch[key] for key in BATCH_COUNTS if key in batch}
        return out


def replace_samples(batch: dict[str, torch.Tensor], bad: list[int], images: list[Any]) -> dict[str, torch.Tensor]:
    """`batch` with every sample in `bad` replaced by a copy of a readable one (all its tensors, so image,
    caption and masks stay paired); the flat indices are recomputed and each copy counts as an unreadable
    image in `data_errors`. `images[i]` becomes the copied sample's image."""
    good = [i for i in range(len(images)) if images[i] is not None]
    if not good:
        raise SampleError("image", "no image of the batch could be decoded")
    rows = list(range(len(images)))
    for n, i in enumerate(bad):
        rows[i] = good[n % len(good)]
        images[i] = images[rows[i]]
    index = torch.tensor(rows)
    out = {k: v for k, v in batch.items() if k not in DERIVED}
    for key, value in batch.items():
        if key not in DERIVED and key not in ("payload", "payload_offsets", *BATCH_COUNTS):
            out[key] = value.index_select(1 if key in CROP_MAJOR else 0, index)
    errors = batch.get("data_errors", torch.zeros(len(SKIP_REASONS), dtype=torch.long)).clone()
    errors.view(-1, len(SKIP_REASONS))[0, SKIP_REASONS.index("image")] += len(bad)
    out["data_errors"] = errors
    return add_indices(out)


def prefetched(batches: Iterator[dict[str, torch.Tensor]], render: DeviceAugment) -> Iterator[dict[str, torch.Tensor]]:
    """`render` each batch; on CUDA on a side stream one batch ahead, so the step never waits for it."""
    if render.device.type != "cuda":
        yield from map(render, batches)
        return
    stream = torch.cuda.Stream(render.device)
    pending: dict[str, torch.Tensor] | None = None
    for batch in batches:
        with torch.cuda.stream(stream):
            ready = render(batch)
        if pending is not None:
            yield _handed_over(pending, stream)
        pending = ready
    if pending is not None:
        yield _handed_over(pending, stream)


def _handed_over(batch: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
    """Make the current stream wait for `stream`'s work on `batch` and keep its memory alive for it."""
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    for value in batch.values():
        if value.is_cuda:
            value.record_stream(current)
    return batch
