"""`harmony bench data`: images/s of the full training loader (decode, multi-crop augmentation,
tokenisation, masking, collation) for each worker count."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from harmony.config import build_config
from harmony.train.distributed import DistInfo


def measure_loader(
    preset: str, data_spec: str, workers: int, batches: int, batch_size: int, overrides: list[str]
) -> dict[str, Any]:
    from harmony.data.loader import build_train_data
    from harmony.data.views import ViewMaker
    from harmony.models.sizes import VISION_SIZES
    from harmony.train.step import make_tokenizer
    from harmony.train.task import PretrainTask

    cfg = build_config(
        preset,
        [
            f"data_spec={data_spec}",
            f"data.num_workers={workers}",
            f"train.batch_size={batch_size}",
            "data.pin_memory=false",
            *overrides,
        ],
    )
    tokenizer = make_tokenizer(cfg)
    needs = PretrainTask(cfg, tokenizer).needs
    maker = ViewMaker(cfg, needs, tokenizer, VISION_SIZES[cfg.model.vision].patch_size)
    data = build_train_data(cfg, maker, DistInfo())
    iterator = data.batches(epoch=0)
    next(iterator)  # start-up (worker spawn, first decode) is not throughput
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        batch = next(iterator)
        seen += batch["global"].shape[1]
    elapsed = time.perf_counter() - start
    return {
        "preset": preset,
        "data": data_spec,
        "workers": workers,
        "batch_size": batch_size,
        "images": seen,
        "seconds": elapsed,
        "images_per_s": seen / elapsed,
    }


def cmd_bench_data(args: argparse.Namespace) -> int:
    counts = [int(w) for w in str(args.workers).split(",")]
    rows = [
        measure_loader(args.preset, args.data, w, args.batches, args.batch_size, list(args.overrides)) for w in counts
    ]
    print(f"{'preset':<24}{'workers':>8}{'images/s':>12}")
    for r in rows:
        print(f"{r['preset']:<24}{r['workers']:>8}{r['images_per_s']:>12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def add_bench_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="preset whose views (crops, masks, captions) are produced")
    p.add_argument("--data", default="builtin:shapes", help="data spec")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--batches", type=int, default=10, help="timed batches per worker count")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
