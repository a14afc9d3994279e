"""The training loader over real shards and CSVs: exact per-batch skip counts, rank x worker splits,
resume, resampling, and streams where nothing is readable."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from harmony.config import Config
from harmony.core.distributed import DistInfo
from harmony.data.csv_source import CsvSource
from harmony.data.decode import RawSample
from harmony.data.errors import SKIP_REASONS, DataError
from harmony.data.guard import describe_skips, worker_message
from harmony.data.loader import TrainData, build_train_data, epoch_permutation
from harmony.data.sources import OPEN_SHARDS, ShardSource, interleave, mixing_rng
from harmony.data.views import view_maker_for
from harmony.models.tokenizer import CaptionTokenizer
from tests.conftest import tiny
from tests.test_data_sources import broken_shards, good, image_bytes, write_csv, write_tar

TOKENIZER = CaptionTokenizer(24)


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging if the code under test never returns."""

    def expire(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def config(spec: Path | str, *overrides: str) -> Config:
    return tiny("clip-tiny-test", f"data_spec={spec}", "data.pin_memory=false", *overrides)


def captions(batch: dict[str, torch.Tensor]) -> list[str]:
    """Captions as the batch holds them (CLIP BPE splits digits: spaces removed to compare)."""
    return ["".join(TOKENIZER.decode(row).split()) for row in batch["text"]]


def errors_of(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    counts = batch["data_errors"].reshape(-1, len(SKIP_REASONS)).sum(0).tolist()
    return {reason: int(n) for reason, n in zip(SKIP_REASONS, counts) if n}


# What reading each shard of `broken_shards` in order produces: a usable key, or a skip reason.
EVENTS = {
    "s-00000.tar": ["a0", "image", "a2", "caption", "a4", "caption", "image", "a7", "image", "a9"],
    "s-00001.tar": ["b0", "b1", "shard"],
    "s-00002.tar": ["shard"],
}


def pass_events(spec: Path, seed: int) -> list[str]:
    """EVENTS in the order one part's first pass meets them: shards in pass order, read OPEN_SHARDS at once."""
    source = ShardSource(str(spec), 7)
    order = [Path(source.urls[i]).name for i in source.pass_order(seed, 0, 0)]
    return list(interleave((iter(EVENTS[name]) for name in order), OPEN_SHARDS, mixing_rng(seed, 0, 0, part=0)))


def test_shard_batches_carry_exact_skip_counts(tmp_path: Path) -> None:
    broken_shards(tmp_path / "s")
    seed = next(s for s in range(50) if pass_events(tmp_path / "s", s)[-1] not in SKIP_REASONS)
    cfg = config(tmp_path / "s", "data.epoch_size=7", "data.shuffle_buffer=0", f"train.seed={seed}")
    cfg.train.batch_size = 1  # one sample a batch to follow each skip: the loader alone, no contrast to refuse it
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo())
    expected, pending = [], {}
    for event in pass_events(tmp_path / "s", seed):
        if event in SKIP_REASONS:
            pending[event] = pending.get(event, 0) + 1
        else:
            expected.append((f"sample{event}", pending))
            pending = {}
    batches = list(data.batches(0))
    assert [(captions(b)[0], errors_of(b)) for b in batches] == expected
    assert data.skipped == {"image": 3, "caption": 2, "shard": 2}
    assert describe_skips(data.skipped) == (
        "data: skipped 7 samples (3 unreadable images, 2 missing or empty captions, 2 unreadable shards)"
    )


class CountingCsv(CsvSource):
    """Records every row the loader tries."""

    def __init__(self, path: Path, cfg: Config) -> None:
        super().__init__(path, cfg.data)
        self.tried: list[int] = []

    def load(self, index: int) -> RawSample:
        self.tried.append(index)
        return super().load(index)


def test_csv_batches_count_each_bad_row_once_and_never_repeat_a_sample(tmp_path: Path) -> None:
    path, bad = write_csv(tmp_path)
    cfg = config(path, "train.batch_size=7")
    source = CountingCsv(path, cfg)
    data = TrainData(cfg, DistInfo(), source, view_maker_for(cfg), steps_per_epoch=2)
    batches = list(data.batches(0))
    assert len(batches) == 2 and all(b["text"].shape[0] == 7 for b in batches)
    assert all(len(set(b["index"].tolist())) == 7 for b in batches)  # a stand-in never repeats its batch's rows
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert not set(indices) & set(bad) and set(bad) <= set(source.tried)
    assert sum(int(b["data_errors"].sum()) for b in batches) == len(bad)  # the 4 bad rows, not the attempts
    assert data.skipped == {"image": 3, "caption": 1, "shard": 0}
    assert {c for b in batches for c in captions(b)} <= {f"sample{i}" for i in range(10)}


def test_missing_images_are_replaced_from_outside_their_batch(tmp_path: Path) -> None:
    """A quarter of the files of a CSV missing: each is replaced by a row of another batch (or a left-out row),
    so no batch holds a pair twice, and each missing row is counted once per epoch."""
    (tmp_path / "img").mkdir()
    lines = ["filepath,caption"]
    for i in range(42):
        if i % 4:
            (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i, fmt="PNG"))
        lines.append(f"img/{i}.png,sample {i}")
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    cfg = config(tmp_path / "rows.csv", "train.batch_size=8")
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo())
    batches = list(data.batches(0))
    assert len(batches) == 5 and all(len(set(b["index"].tolist())) == 8 for b in batches)
    assert all(i % 4 for b in batches for i in b["index"].tolist())
    perm = epoch_permutation(42, cfg.train.seed, 0)
    missing_in_batches = sum(1 for i in perm[:40] if i % 4 == 0)  # the 2 left-out rows only stand in
    assert sum(int(b["data_errors"].sum()) for b in batches) == data.skipped["image"] == missing_in_batches
    with pytest.raises(DataError, match="every other sample is in its global batch of 8"):
        small = tmp_path / "small.csv"
        small.write_text("\n".join(lines[:9]) + "\n")  # 8 rows, 4 missing, one batch of 8
        cfg = config(small, "train.batch_size=8")
        next(build_train_data(cfg, view_maker_for(cfg), DistInfo()).batches(0))


def shard_set(folder: Path, shards: int = 8, per_shard: int = 5) -> set[str]:
    folder.mkdir()
    for s in range(shards):
        members = [m for i in range(per_shard) for m in good(f"k{s}x{i}", s * per_shard + i)]
        write_tar(folder / f"p-{s:05d}.tar", members)
    return {f"samplek{s}x{i}" for s in range(shards) for i in range(per_shard)}


def rank_captions(cfg: Config, rank: int) -> list[str]:
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo(rank, 2))
    return [c for batch in data.batches(0) for c in captions(batch)]


def test_two_ranks_two_workers_split_shards_disjointly(tmp_path: Path) -> None:
    everything = shard_set(tmp_path / "p")
    cfg = config(tmp_path / "p", "train.batch_size=10", "data.num_workers=2", "data.shuffle_buffer=3")
    seen = [rank_captions(cfg, rank) for rank in range(2)]
    assert [len(s) for s in seen] == [20, 20]
    assert len(set(seen[0] + seen[1])) == 40 and set(seen[0] + seen[1]) == everything


def test_two_ranks_two_workers_split_csv_rows_disjointly(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    lines = ["filepath\tcaption"]
    for i in range(20):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i, fmt="PNG"))
        lines.append(f"img/{i}.png\tsample {i}")
    (tmp_path / "rows.tsv").write_text("\n".join(lines))
    cfg = config(tmp_path / "rows.tsv", "train.batch_size=10", "data.num_workers=2")
    seen = [rank_captions(cfg, rank) for rank in range(2)]
    assert sorted(seen[0] + seen[1]) == sorted(f"sample{i}" for i in range(20))


def test_resumed_shard_epoch_replays_the_remaining_batches(tmp_path: Path) -> None:
    shard_set(tmp_path / "p", shards=4, per_shard=6)
    cfg = config(tmp_path / "p", "train.batch_size=4", "data.num_workers=2", "data.shuffle_buffer=5")
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo())
    full = list(data.batches(1))
    resumed = list(data.batches(1, start_step=3))
    assert len(full) == 6 and len(resumed) == 3
    for a, b in zip(full[3:], resumed):
        assert captions(a) == captions(b) and torch.equal(a["global"], b["global"])
    assert captions(full[0]) != captions(next(iter(data.batches(2))))


def test_resampled_shards_stream_endlessly(tmp_path: Path) -> None:
    shard_set(tmp_path / "p", shards=3, per_shard=4)
    source = ShardSource(str(tmp_path / "p"), resample=True)
    draws = source.resampled(0, 0, 0, part=1, parts=2)
    assert len(draws) == 2 and set(draws) <= set(source.urls) and draws == source.resampled(0, 0, 0, 1, 2)
    cfg = config(tmp_path / "p", "train.batch_size=4", "data.resample_shards=true", "data.epoch_size=40")
    batches = list(build_train_data(cfg, view_maker_for(cfg), DistInfo()).batches(0))
    assert len(batches) == 10 and all(b["global"].shape[1] == 4 for b in batches)


def test_shards_without_a_usable_sample_are_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    for s in range(2):
        write_tar(tmp_path / "s" / f"n-{s}.tar", [(f"k{s}{i}.jpg", image_bytes(i)) for i in range(3)])
    with pytest.raises(DataError, match="holds no usable samples") as info:
        ShardSource(str(tmp_path / "s"))
    assert "\n" not in str(info.value) and "k00.jpg" in str(info.value) and "no caption" in str(info.value)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("remote", [False, True])
def test_nothing_readable_fails_with_one_line(tmp_path: Path, workers: int, remote: bool) -> None:
    """Captions but no decodable image (local shards), or nothing usable in a stream whose contents are not
    counted in advance (`pipe:`): the loader stops with one line instead of spinning forever."""
    (tmp_path / "s").mkdir()
    for s in range(2):
        members = []
        for i in range(3):
            members += [(f"k{s}{i}.jpg", b"not an image")] + ([] if remote else [(f"k{s}{i}.txt", b"a caption")])
        write_tar(tmp_path / "s" / f"n-{s}.tar", members)
    spec = f"pipe:cat {tmp_path}/s/n-{{0..1}}.tar" if remote else str(tmp_path / "s")
    cfg = config(spec, "train.batch_size=2", "data.epoch_size=6", f"data.num_workers={workers}")
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo())
    with deadline(60), pytest.raises(DataError, match="nothing readable") as info:
        next(data.batches(0))
    assert "\n" not in str(info.value) and ("no caption" if remote else "k") in str(info.value)


def test_a_csv_of_unreadable_rows_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text("filepath,caption\n" + "".join(f"gone{i}.jpg,a cat\n" for i in range(8)))
    cfg = config(tmp_path / "rows.csv", "train.batch_size=4")
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo())
    with deadline(60), pytest.raises(DataError, match=r"could replace it .* are unusable too") as info:
        next(data.batches(0))
    assert "\n" not in str(info.value)


def test_worker_message_and_skip_summary() -> None:
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        "  File \"x.py\", line 1, in f\nharmony.data.errors.DataError: nothing readable in 'a'\n"
    )
    assert worker_message(wrapped) == "nothing readable in 'a'"
    assert worker_message(DataError("plain: message")) == "plain: message"
    assert describe_skips({"image": 0, "caption": 0, "shard": 0}) == "data: nothing skipped"
    assert describe_skips({"image": 1, "caption": 0, "shard": 0}) == "data: skipped 1 sample (1 unreadable image)"


def test_training_runs_from_a_csv_and_logs_skips(tmp_path: Path) -> None:
    from harmony.train.loop import train

    path, _ = write_csv(tmp_path)
    result = train(
        config(path, "train.batch_size=7", "train.max_steps=2", "train.log_every=2", "train.device=cpu"),
        tmp_path / "run",
        progress=False,
    )
    assert result.steps == 2 and result.last_metrics["data_errors"] >= 4
