"""`harmony bench data`: images/s of the full training loader (read, decode, multi-crop augmentation,
tokenisation, masking, collation) for each worker count, and with `--profile` where one process
spends its time per image, stage by stage."""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from harmony.config import Config
from harmony.presets import build_config
from harmony.train.distributed import DistInfo


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
    preset: str, data_spec: str, workers: int, batches: int, batch_size: int, overrides: list[str]
) -> dict[str, Any]:
    """Steady-state images/s: the first 2 x workers batches (start-up, filling the prefetch queue) are not timed."""
    from harmony.data.loader import TrainData, build_train_data
    from harmony.data.views import view_maker_for

    cfg = _config(preset, data_spec, workers, batch_size, overrides)
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo())

    def endless(data: TrainData) -> Iterator[dict[str, torch.Tensor]]:
        for epoch in itertools.count():
            yield from data.batches(epoch)

    iterator = endless(data)
    for _ in range(max(2, 2 * workers)):
        next(iterator)
    start, seen, skipped = time.perf_counter(), 0, 0
    for _ in range(batches):
        batch = next(iterator)
        seen += batch["global"].shape[1]
        skipped += int(batch["data_errors"].sum())
    elapsed = time.perf_counter() - start
    return {
        "preset": preset,
        "data": data_spec,
        "workers": workers,
        "batch_size": batch_size,
        "images": seen,
        "skipped": skipped,
        "seconds": elapsed,
        "images_per_s": seen / elapsed,
    }


def profile_stages(preset: str, data_spec: str, samples: int, overrides: list[str]) -> dict[str, float]:
    """Milliseconds per image of each loader stage, in this process on one thread (as a loader worker runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _profile_stages(preset, data_spec, samples, overrides)
    finally:
        torch.set_num_threads(threads)


def _profile_stages(preset: str, data_spec: str, samples: int, overrides: list[str]) -> dict[str, float]:
    from harmony.data.augment import render_crops
    from harmony.data.decode import decode_pixels
    from harmony.data.inspect import in_order
    from harmony.data.sources import open_source
    from harmony.data.views import collate, view_maker_for

    cfg = _config(preset, data_spec, 0, samples, overrides)
    maker = view_maker_for(cfg)
    totals = dict.fromkeys(["read", "decode", "crops", "masks", "text", "collate"], 0.0)
    source = open_source(data_spec, cfg)  # counting shards at start-up is not per-image work
    start = time.perf_counter()
    raws = list(itertools.islice(in_order(source, cfg.data.max_image_pixels), samples))
    totals["read"] = time.perf_counter() - start
    views = []
    for seed, raw in enumerate(r for r in raws if not isinstance(r, Exception)):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        t0 = time.perf_counter()
        glob, local = maker.plans(*raw.image.size, rng)
        pixels, factor = decode_pixels(raw.image, glob + local)
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
        for stage, seconds in zip(["decode", "crops", "masks", "text"], [t1 - t0, t2 - t1, t3 - t2, t4 - t3]):
            totals[stage] += seconds
    start = time.perf_counter()
    collate(views)
    totals["collate"] = time.perf_counter() - start
    return {stage: 1000 * seconds / max(len(views), 1) for stage, seconds in totals.items()}


def cmd_bench_data(args: argparse.Namespace) -> int:
    counts = [int(w) for w in str(args.workers).split(",")]
    overrides = list(args.overrides)
    rows = [measure_loader(args.preset, args.data, w, args.batches, args.batch_size, overrides) for w in counts]
    print(f"{'preset':<24}{'workers':>8}{'images/s':>12}{'skipped':>9}")
    for r in rows:
        print(f"{r['preset']:<24}{r['workers']:>8}{r['images_per_s']:>12.1f}{r['skipped']:>9}")
    result: dict[str, Any] = {"loader": rows}
    if args.profile:
        stages = profile_stages(args.preset, args.data, args.profile, overrides)
        total = sum(stages.values())
        print(f"one process, ms per image ({args.profile} images): total {total:.2f} = {1000 / total:.0f} images/s")
        for stage, ms in stages.items():
            print(f"  {stage:<10}{ms:8.3f} ms {100 * ms / total:5.1f}%")
        result["profile_ms_per_image"] = stages
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_bench_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="preset whose views (crops, masks, captions) are produced")
    p.add_argument("--data", default="builtin:shapes", help="data spec")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also time each stage over N images")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_workers=4")
