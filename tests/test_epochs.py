"""An epoch trains every usable sample once, for any number of shards, ranks and workers: the parts of a pass
are balanced by samples (`harmony.data.shard_plan`), only the last partial global batch is left out, and a
resumed epoch gives the rest of the same samples."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from harmony.core.distributed import DistInfo
from harmony.data.loader import build_train_data
from harmony.data.shard_plan import Layout, contiguous_segments, proportional
from harmony.data.views import view_maker_for
from tests.test_data_loader import captions, config
from tests.test_data_sources import good, write_tar


def shards(folder: Path, sizes: list[int], corrupt: int = 0) -> set[str]:
    """Shards of `sizes` samples (captions `sample<key>`); the first `corrupt` samples of shard 0 have a
    caption but an image that does not decode. Returns the captions of the usable samples."""
    folder.mkdir()
    usable = set()
    for s, size in enumerate(sizes):
        members = []
        for i in range(size):
            key = f"k{s}x{i}"
            if s == 0 and i < corrupt:
                members += [(f"{key}.jpg", b"not an image"), (f"{key}.txt", f"sample {key}".encode())]
            else:
                members += good(key, 100 * s + i)
                usable.add(f"sample{key}")
        write_tar(folder / f"e-{s:05d}.tar", members)
    return usable


def epoch_captions(spec: Path, ranks: int, workers: int, epoch: int, *overrides: str, start: int = 0) -> list[str]:
    """Every caption trained in `epoch` (from step `start`), over all ranks."""
    cfg = config(spec, "train.batch_size=8", f"data.num_workers={workers}", "data.shuffle_buffer=4", *overrides)
    out = []
    for rank in range(ranks):
        data = build_train_data(cfg, view_maker_for(cfg), DistInfo(rank, ranks))
        out += [c for batch in data.batches(epoch, start) for c in captions(batch)]
    return out


@pytest.mark.parametrize(
    ("sizes", "ranks", "workers"),
    [
        ([22, 22, 20], 2, 1),  # shards >= parts, unequal: the case that used to repeat ~10 and drop ~10
        ([22, 22, 20], 1, 2),
        ([22, 22, 20], 2, 2),  # fewer shards than parts: every part reads every shard
        ([64], 2, 1),
        ([9, 31, 17, 15], 1, 3),  # 9 global batches over 3 workers, uneven shards
        ([5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 6], 2, 2),  # 65 samples: one left out
    ],
)
def test_an_epoch_trains_every_sample_once(tmp_path: Path, sizes: list[int], ranks: int, workers: int) -> None:
    usable = shards(tmp_path / "s", sizes)
    steps = len(usable) // 8
    for epoch in range(2):
        seen = epoch_captions(tmp_path / "s", ranks, workers, epoch)
        assert len(seen) == steps * 8
        assert not [c for c, n in Counter(seen).items() if n > 1], "a sample repeated within the epoch"
        assert set(seen) <= usable and len(usable - set(seen)) == len(usable) - steps * 8


def test_a_resumed_epoch_trains_the_rest_of_the_same_samples(tmp_path: Path) -> None:
    shards(tmp_path / "s", [22, 22, 20])
    whole = epoch_captions(tmp_path / "s", 2, 1, 1)
    first_three = [c for rank in range(2) for c in whole[rank * 32 : rank * 32 + 12]]
    rest = epoch_captions(tmp_path / "s", 2, 1, 1, start=3)
    assert sorted(first_three + rest) == sorted(whole)


def test_spares_replace_samples_that_fail_to_decode_without_repeats(tmp_path: Path) -> None:
    usable = shards(tmp_path / "s", [23, 23, 24], corrupt=3)  # 70 samples, 3 broken: 64 trained, 3 spare
    seen = epoch_captions(tmp_path / "s", 2, 1, 0)
    assert len(seen) == 64 and len(set(seen)) == 64 and set(seen) <= usable


def test_the_plan_deals_each_usable_sample_to_one_part() -> None:
    urls, counts = ["a", "b", "c"], [22, 22, 20]
    layout = Layout(ranks=2, workers=2, local_batch=4, steps=8)
    ranges = []
    for part in range(layout.parts):
        ranges.append([(s.url, s.lo, s.hi) for s in contiguous_segments(urls, counts, layout, part)])
        assert sum(hi - lo for _, lo, hi in ranges[-1]) >= layout.quota(part) == 16
    covered = Counter((url, i) for part in ranges for url, lo, hi in part for i in range(lo, hi))
    assert len(covered) == 64 and set(covered.values()) == {1}
    assert proportional(10, [3, 3, 0, 1]) == [4, 4, 0, 2] and sum(proportional(7, [1, 1, 1])) == 7
    assert [layout.slot(p) for p in range(0, 32, 4)] == [0, 2, 1, 3, 0, 2, 1, 3]


def test_a_stats_file_that_overcounts_is_said(tmp_path: Path) -> None:
    """img2dataset's `_stats.json` sizes the epoch without reading the shard; when it claims more samples than
    the shard holds, the shortfall is counted and named instead of passing silently."""
    import json

    shards(tmp_path / "s", [10, 10, 12])
    (tmp_path / "s" / "e-00000_stats.json").write_text(json.dumps({"successes": 14}))
    cfg = config(tmp_path / "s", "train.batch_size=8", "data.num_workers=0")
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo())
    assert data.source.epoch_size == 36 and data.steps_per_epoch == 4
    batches = list(data.batches(0))
    assert len(batches) == 4 and data.skipped["shard"] == 1
