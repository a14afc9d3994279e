"""`harmony bench data`: images/s of the full training loader (read, decode, multi-crop augmentation,
tokenisation, masking, collation) for each worker count, and with `--profile` where one process
spends its time per image, stage by stage, for both the worker path and the `data.device_augment` path
(whose workers only read, plan and ship bytes); with `--device`, also the images/s at which that device
decodes and crops. Each worker count is timed for `--seconds` (or a fixed number of `--batches`) after a
warm-up, and its line is printed as soon as it is measured."""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from harmony.config import Config, ConfigError
from harmony.outputs import check_output_file
from harmony.presets import build_config

if TYPE_CHECKING:
    import torch


def _config(preset: str, data_spec: str, workers: int, batch_size: int, overrides: list[str]) -> Config:
    return build_config(
        preset,
        [
            f"data_spec={data_spec}",
            f"data.num_workers={workers}",
            f"train.batch_size={batch_size}",
            "data.pin_memory=false",
            *overrides,
        ],
    )


def measure_loader(
    preset: str,
    data_spec: str,
    workers: int,
    batches: int,
    batch_size: int,
    overrides: list[str],
    seconds: float = 10.0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Steady-state images/s over `batches` batches, or (batches 0) over at least `seconds`; the first batch of
    every worker (process start-up, first decode) is not timed."""
    import torch

    from harmony.core.distributed import DistInfo
    from harmony.data.loader import TrainData, build_train_data
    from harmony.data.views import view_maker_for

    cfg = _config(preset, data_spec, workers, batch_size, overrides)
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo(), torch.device(device))

    def endless(data: TrainData) -> Iterator[dict[str, torch.Tensor]]:
        for epoch in itertools.count():
            yield from data.batches(epoch)

    iterator = endless(data)
    for _ in range(max(1, workers)):
        next(iterator)
    start, seen, skipped, timed = time.perf_counter(), 0, 0, 0
    while timed < batches if batches else time.perf_counter() - start < seconds:
        batch = next(iterator)
        seen += batch["global"].shape[1]
        skipped += int(batch["data_errors"].sum())
        timed += 1
    elapsed = time.perf_counter() - start
    return {
        "preset": preset,
        "data": data_spec,
        "workers": workers,
        "batch_size": batch_size,
        "batches": timed,
        "images": seen,
        "skipped": skipped,
        "seconds": elapsed,
        "images_per_s": seen / elapsed,
    }


def profile_stages(
    preset: str, data_spec: str, samples: int, overrides: list[str], device_augment: bool = False
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Milliseconds per image of each loader stage, in this process on one thread (as a loader worker runs),
    and the collated batch. With `device_augment` the worker's stages are the device path's: plans and bytes
    ("ship", which decodes only what the device will not take) instead of "decode" and "crops"."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _profile_stages(preset, data_spec, samples, overrides, device_augment)
    finally:
        torch.set_num_threads(threads)


def _profile_stages(
    preset: str, data_spec: str, samples: int, overrides: list[str], device_augment: bool
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    import torch

    from harmony.data.augment import render_crops
    from harmony.data.decode import decode_pixels, upright_size
    from harmony.data.device_augment import PlanMaker
    from harmony.data.inspect import in_order
    from harmony.data.sources import open_source
    from harmony.data.views import collate_for, view_maker_for

    cfg = _config(preset, data_spec, 0, samples, overrides)
    maker = view_maker_for(cfg)
    stages = ["read", "ship"] if device_augment else ["read", "decode", "crops"]
    totals = dict.fromkeys([*stages, "masks", "text", "collate"], 0.0)
    shipper = PlanMaker(maker)
    source = open_source(data_spec, cfg)  # counting shards at start-up is not per-image work
    start = time.perf_counter()
    raws = list(itertools.islice(in_order(source, cfg.data.max_image_pixels), samples))
    totals["read"] = time.perf_counter() - start
    views = []
    for seed, raw in enumerate(r for r in raws if not isinstance(r, Exception)):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        t0 = time.perf_counter()
        glob, local = maker.plans(*upright_size(raw.image), rng)
        if device_augment:
            view = shipper.payload(raw.image, glob + local)
            view.update(shipper.tables(glob, local))
            t1 = time.perf_counter()
        else:
            pixels, factor = decode_pixels(raw.image, glob + local, maker.background)
            t1 = time.perf_counter()
            view = {"global": render_crops(pixels, glob, factor)}
            if local:
                view["local"] = render_crops(pixels, local, factor)
        t2 = time.perf_counter()
        view.update(maker.masks(rng, gen))
        t3 = time.perf_counter()
        view.update(maker.text(raw.caption, gen))
        t4 = time.perf_counter()
        views.append(view)
        timed = ["ship", "ship"] if device_augment else ["decode", "crops"]
        for stage, seconds in zip([*timed, "masks", "text"], [t1 - t0, t2 - t1, t3 - t2, t4 - t3]):
            totals[stage] += seconds
    start = time.perf_counter()
    batch = collate_for(cfg)(views)
    totals["collate"] = time.perf_counter() - start
    return {stage: 1000 * seconds / max(len(views), 1) for stage, seconds in totals.items()}, batch


def device_rate(preset: str, batch: dict[str, torch.Tensor], overrides: list[str], device: str) -> float:
    """Images/s at which `device` decodes and crops the device path's collated `batch` (after a warm-up)."""
    import torch

    from harmony.data.device_augment import DeviceAugment
    from harmony.data.views import view_maker_for

    render = DeviceAugment(view_maker_for(build_config(preset, overrides)), torch.device(device))
    sync = torch.cuda.synchronize if render.device.type == "cuda" else (lambda: None)
    render(batch)
    sync()
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or time.perf_counter() - start < 1.0:
        render(batch)
        rounds += 1
    sync()
    return rounds * len(batch["source"]) / (time.perf_counter() - start)


def worker_counts(text: str) -> list[int]:
    """'0,2,4' -> [0, 2, 4] (a single value is one count); ConfigError naming the flag otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"--workers takes comma-separated counts >= 0, e.g. 0,2,4; got {text!r}")
    return [int(p) for p in parts]


def check_args(args: argparse.Namespace) -> list[int]:
    """The worker counts; every count flag checked before anything is measured."""
    counts = worker_counts(args.workers)
    for flag, value in [("--batches", args.batches), ("--profile", args.profile)]:
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ConfigError(f"--device takes cpu, cuda or cuda:N, got {args.device!r}")
    from harmony.core.device import resolve_device

    resolve_device(args.device)  # cuda on a machine without it: the one-line ConfigError
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if not args.batches and not args.seconds > 0:
        raise ConfigError(f"--seconds must be positive, got {args.seconds}")
    return counts


def cmd_bench_data(args: argparse.Namespace) -> int:
    counts = check_args(args)
    json_path = check_output_file(args.json, "--json") if args.json else None
    overrides = list(args.overrides)
    length = f"{args.batches} batches" if args.batches else f"{args.seconds:g} s"
    print(
        f"bench data: {args.preset} on {args.data}, batch {args.batch_size}, workers {','.join(map(str, counts))}: "
        f"{length} each after a warm-up batch per worker",
        flush=True,
    )
    print(f"{'preset':<24}{'workers':>8}{'images/s':>12}{'skipped':>9}", flush=True)
    rows = []
    for w in counts:
        r = measure_loader(
            args.preset, args.data, w, args.batches, args.batch_size, overrides, args.seconds, args.device
        )
        print(f"{r['preset']:<24}{r['workers']:>8}{r['images_per_s']:>12.1f}{r['skipped']:>9}", flush=True)
        rows.append(r)
    result: dict[str, Any] = {"loader": rows, "overrides": overrides}
    if args.profile:
        for path, on_device in (("device_augment", True), ("worker", False)):  # the worker path gets warm caches
            stages, batch = profile_stages(args.preset, args.data, args.profile, overrides, on_device)
            total = sum(stages.values())
            print(
                f"{path} path, one worker process, CPU ms per image ({args.profile} images): "
                f"total {total:.2f} = {1000 / total:.0f} images/s per core"
            )
            for stage, ms in stages.items():
                print(f"  {stage:<10}{ms:8.3f} ms {100 * ms / total:5.1f}%")
            result["profile_ms_per_image" if path == "worker" else "device_augment_ms_per_image"] = stages
            if on_device:
                rate = device_rate(args.preset, batch, overrides, args.device)
                print(f"device_augment path, decode + crops on {args.device}: {rate:.0f} images/s", flush=True)
                result["device_images_per_s"] = {"device": args.device, "images_per_s": rate}
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_bench_data_arguments(p: argparse.ArgumentParser) -> None:
    p.prog = "harmony bench data"  # argparse would put the parent's positionals ('[key=value ...]') in the name
    p.add_argument("--preset", required=True, help="preset whose views (crops, masks, captions) are produced")
    p.add_argument("--data", default="builtin:shapes", help="data spec")
    p.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts, e.g. 0,2,4 (or one)")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per worker count (after warm-up)")
    p.add_argument("--batches", type=int, default=0, help="timed batches per worker count instead of --seconds")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also time each stage over N images")
    p.add_argument("--device", default="cpu", help="where data.device_augment decodes and crops (cpu, cuda)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.shuffle_buffer=0")
