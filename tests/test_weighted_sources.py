"""Several sources mixed by weight (`data.weights`, harmony.data.mixing): each sample's source is drawn with the
weights, the same for any number of ranks and for a resumed run; a source that runs out is read again, said
once and counted; without weights `::` still joins specs into one source."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from harmony.config import Config, ConfigError
from harmony.core.distributed import DistInfo
from harmony.data.loader import build_train_data
from harmony.data.mixing import EpochMix, Mixture, draw_sources, source_names
from harmony.data.shard_plan import Layout
from harmony.data.sources import ShardSource
from harmony.data.views import view_maker_for
from harmony.presets import build_config, load_preset
from tests.conftest import Cli, TwoRanks
from tests.test_data_loader import captions, config
from tests.test_data_sources import good, image_bytes, write_tar
from tests.two_ranks import MIXED_RUN


def shard_folder(folder: Path, shards: int = 3, per_shard: int = 10) -> Path:
    """Shards of captions `sample k<s>x<i>`."""
    folder.mkdir()
    for s in range(shards):
        write_tar(folder / f"m-{s:05d}.tar", [m for i in range(per_shard) for m in good(f"k{s}x{i}", 100 * s + i)])
    return folder


def csv_rows(folder: Path, rows: int) -> Path:
    """A CSV of `rows` images with captions `row <i>`."""
    (folder / "img").mkdir(parents=True)
    lines = ["filepath,caption"]
    for i in range(rows):
        (folder / "img" / f"{i}.png").write_bytes(image_bytes(500 + i, fmt="PNG"))
        lines.append(f"img/{i}.png,row {i}")
    (folder / "rows.csv").write_text("\n".join(lines) + "\n")
    return folder / "rows.csv"


def mixed_config(tmp_path: Path, *overrides: str) -> Config:
    """30 shard samples and 10 CSV rows, half and half: an epoch of 40 (5 batches of 8) draws about 20 from each,
    so the CSV is read twice over and the shards not quite once."""
    spec = f"{shard_folder(tmp_path / 'shards')}::{csv_rows(tmp_path / 'csv', 10)}"
    return config(spec, "data.weights=0.5,0.5", "train.batch_size=8", "data.shuffle_buffer=4", *overrides)


def epoch_batches(cfg: Config, dist: DistInfo, epoch: int = 0, start: int = 0) -> list[dict[str, torch.Tensor]]:
    return list(build_train_data(cfg, view_maker_for(cfg), dist).batches(epoch, start))


def test_drawn_shares_are_within_three_standard_errors_of_the_weights() -> None:
    weights, count = [0.3, 0.7], 2000
    bound = 3 * math.sqrt(weights[0] * weights[1] / count)  # the standard error of a share over `count` draws
    for seed in range(5):
        share = float(np.mean(draw_sources(weights, seed, epoch=seed, count=count) == 0))
        assert abs(share - weights[0]) <= bound, (seed, share, bound)
    unnormalised = draw_sources([3.0, 7.0], 0, 0, count)
    assert np.array_equal(unnormalised, draw_sources(weights, 0, 0, count))


def test_every_layout_draws_the_same_source_at_each_position() -> None:
    one = EpochMix([0.3, 0.7], 4, 1, Layout(ranks=1, workers=1, local_batch=8, steps=6))
    two = EpochMix([0.3, 0.7], 4, 1, Layout(ranks=2, workers=3, local_batch=4, steps=6))
    for step in range(6):
        assert one.batch_sources(step, 0) == two.batch_sources(step, 0) + two.batch_sources(step, 1)
    assert [len(o) for o in one.owners] == [len(o) for o in two.owners]


def test_two_ranks_times_b_draw_the_samples_of_one_rank_times_2b(tmp_path: Path) -> None:
    """The CSV (map-style) gives the same row at every place; the shards the same source at every place and no
    sample twice, since the epoch draws fewer of them than they hold (which of them: as without mixing, a pass's
    leftover differs between layouts)."""
    cfg = mixed_config(tmp_path, "data.num_workers=0")
    one = epoch_batches(cfg, DistInfo())
    ranks = [epoch_batches(cfg, DistInfo(rank, 2)) for rank in range(2)]
    assert len(one) == 5 and all(len(r) == 5 for r in ranks)
    shard_captions = []
    for step, batch in enumerate(one):
        together = captions(ranks[0][step]) + captions(ranks[1][step])
        assert [c.startswith("row") for c in captions(batch)] == [c.startswith("row") for c in together]
        assert [c for c in captions(batch) if c.startswith("row")] == [c for c in together if c.startswith("row")]
        assert torch.equal(batch["data_sources"], ranks[0][step]["data_sources"] + ranks[1][step]["data_sources"])
        shard_captions += [c for c in together if c.startswith("sample")]
    assert len(shard_captions) == len(set(shard_captions)) < 30


def test_a_resumed_epoch_draws_the_samples_of_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg = mixed_config(tmp_path, "data.num_workers=2")
    whole = epoch_batches(cfg, DistInfo(), epoch=1)
    resumed = epoch_batches(cfg, DistInfo(), epoch=1, start=2)
    assert len(resumed) == 3
    for a, b in zip(whole[2:], resumed):
        assert captions(a) == captions(b) and torch.equal(a["data_sources"], b["data_sources"])
        assert torch.equal(a["global"], b["global"])
    drawn = sum(b["data_sources"] for b in whole)
    assert drawn[0].sum() == 40 and drawn[1, 0] == 0 and drawn[1, 1] == drawn[0, 1] - 10  # the CSV re-read


def test_a_source_that_runs_out_is_read_again_said_once_and_counted(tmp_path: Path, cli: Cli) -> None:
    """4 CSV rows against 64 built-in samples, half and half: the CSV runs out in the first batches and is read
    again and again; metrics.jsonl counts exactly what the epoch's draw gave each step."""
    spec = f"{csv_rows(tmp_path, 4)}::builtin:shapes"
    args = ("--preset", "clip-tiny-test", "--data", spec, "data.weights=1,1", "--max-steps", "4", "--no-progress")
    proc = cli("train", *args, "train.log_every=1", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ran out within an epoch") == 1 and "source 'rows' (4 samples)" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mix = EpochMix([0.5, 0.5], 0, 0, Layout(local_batch=8, steps=(4 + 64) // 8))
    csv_draws = 0
    for row in rows:
        drawn = Counter(mix.batch_sources(row["step"] - 1, 0))
        assert (row["data/source_rows"], row["data/source_shapes"]) == (drawn[0], drawn[1])
        assert row["data/reread_rows"] == max(csv_draws + drawn[0] - 4, 0) - max(csv_draws - 4, 0)
        assert row["data/reread_shapes"] == 0
        csv_draws += drawn[0]
    assert csv_draws > 8 and f"mix: rows {csv_draws} " in proc.stdout


def test_weights_must_match_the_sources_and_be_positive(tmp_path: Path, cli: Cli) -> None:
    proc = cli("train", "--preset", "clip-tiny-test", "--data", "a::b::c", "data.weights=0.3,0.7")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "'data.weights' gives 2 weight(s) for the 3 source(s)" in proc.stderr
    with pytest.raises(ConfigError, match="must be positive, got 0 for 'b'"):
        build_config("clip-tiny-test", ["data_spec=a::b", "data.weights=1,0"])
    (tmp_path / "mix.yaml").write_text("data_spec: general/{0000..0999}.tar::domain/*.tar\ndata:\n  weights: [3, 7]\n")
    assert load_preset(str(tmp_path / "mix.yaml")).data.weights == [3.0, 7.0]


def test_source_names() -> None:
    specs = ["general/{0000..0999}.tar", "domain/*.tar", "data/pairs.csv", "builtin:shapes:val", "x/a.tar", "y/a"]
    assert source_names(specs) == ["general", "domain", "pairs", "shapes_val", "a_4", "a_5"]
    assert source_names(["{0..9}.tar", "pipe:aws s3 cp s3://bucket/{000..099}.tar -"]) == ["source0", "bucket"]


def test_without_weights_double_colon_joins_one_source(tmp_path: Path) -> None:
    first, second = shard_folder(tmp_path / "a", 1, 8), shard_folder(tmp_path / "b", 1, 8)
    cfg = config(f"{first}::{second}", "train.batch_size=8", "data.num_workers=0")
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo())
    assert isinstance(data.source, ShardSource) and len(data.source.urls) == 2 and data.mixture is None
    assert "data_sources" not in next(data.batches(0))
    mixed = build_train_data(config(cfg.data_spec, "data.weights=1,3"), view_maker_for(cfg), DistInfo())
    assert isinstance(mixed.source, Mixture) and mixed.source.weights == [0.25, 0.75] and mixed.source.epoch_size == 16


def test_two_ranks_mix_as_one_rank_does(two_ranks: TwoRanks, one_rank: Callable[..., Path]) -> None:
    """Both built-in sources are map-style: the same samples, so the same losses, and the counts summed over
    the ranks."""
    two = two_ranks.folder("mixed_sources") / "run" / "metrics.jsonl"
    one = one_rank(*MIXED_RUN) / "metrics.jsonl"
    rows = [[json.loads(line) for line in path.read_text().splitlines()] for path in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        counts = [(a[k], b[k]) for k in a if k.startswith("data/")]
        assert len(counts) == 4 and all(x == y for x, y in counts)
        assert a["data/source_shapes"] + a["data/source_shapes_val"] == 8
