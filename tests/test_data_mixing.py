"""Class-sorted data still gives mixed batches: converters shuffle before sharding, the loader reads several
shards at once, and `harmony data inspect` warns about a sorted order."""

from __future__ import annotations

import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmony.cli import main
from harmony.core.distributed import DistInfo
from harmony.data.errors import SampleError
from harmony.data.loader import build_train_data
from harmony.data.sources import Layout, PassEnd, mixing_rng, strided_samples
from harmony.data.views import view_maker_for
from tests.test_data_loader import captions, config
from tests.test_data_sources import image_bytes, write_tar

CLASSES = ("cat", "dog", "fox", "owl")


def sorted_shards(folder: Path, per_class: int = 64) -> Path:
    """One class per shard, as a sorted folder written in order gives: real tar files."""
    folder.mkdir()
    for c, name in enumerate(CLASSES):
        members = []
        for i in range(per_class):
            members += [
                (f"{name}{i:03d}.jpg", image_bytes(c * per_class + i)),
                (f"{name}{i:03d}.txt", f"a {name}".encode()),
            ]
        write_tar(folder / f"sorted-{c:05d}.tar", members)
    return folder


def label_of(caption: str) -> str:
    return next(name for name in CLASSES if caption.endswith(name))


def total_variation(batch: list[str]) -> float:
    """Distance between a batch's label histogram and the dataset's (uniform over CLASSES)."""
    counts = Counter(batch)
    return 0.5 * sum(abs(counts[name] / len(batch) - 1 / len(CLASSES)) for name in CLASSES)


def test_class_sorted_shards_give_mixed_batches(tmp_path: Path) -> None:
    spec = sorted_shards(tmp_path / "s")
    cfg = config(spec, "train.batch_size=16", "data.shuffle_buffer=16", "data.num_workers=0")
    data = build_train_data(cfg, view_maker_for(cfg), DistInfo())
    batches = [[label_of(c) for c in captions(b)] for b in data.batches(0)]
    assert len(batches) == 16 and sorted(label for b in batches for label in b) == sorted(
        n for n in CLASSES for _ in range(64)
    )
    assert all(len(set(b)) >= 3 for b in batches[:-2]), batches  # the last ones drain the final shards
    assert np.mean([total_variation(b) for b in batches]) < 0.25
    resumed = [[label_of(c) for c in captions(b)] for b in data.batches(0, start_step=5)]
    assert resumed == batches[5:]


def sorted_folder(root: Path, per_class: int = 12) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 12), (40 * c, 3 * i, 0)).save(root / name / f"{i:03d}.png")
    return root


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`harmony ARGS` in this process (the parsers and commands as the script runs them): status, stdout."""
    code = main(list(args))
    return code, capsys.readouterr().out


def shard_captions(folder: Path) -> list[str]:
    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]  # type: ignore[union-attr]
    return out


def test_from_folder_shuffles_before_sharding_and_records_the_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = sorted_folder(tmp_path / "photos")
    common = ("--caption-template", "a {label}", "--shard-size", "12", "--no-progress")
    code, out = cli(capsys, "data", "from-folder", str(root), "--out", str(tmp_path / "s"), "--seed", "3", *common)
    assert code == 0 and "wrote 48 samples to 4 shard(s)" in out and "shuffled with seed 3" in out
    written = shard_captions(tmp_path / "s")
    assert sorted(written) == sorted(f"a {name}" for name in CLASSES for _ in range(12))
    for i in range(4):
        assert len(set(written[12 * i : 12 * i + 12])) >= 3  # every shard mixes classes
    record = json.loads((tmp_path / "s" / "shard-conversion.json").read_text())
    assert record["shuffle_seed"] == 3 and record["samples"] == 48 and record["shard_size"] == 12
    code, _ = cli(capsys, "data", "from-folder", str(root), "--out", str(tmp_path / "again"), "--seed", "3", *common)
    assert code == 0 and shard_captions(tmp_path / "again") == written
    code, out = cli(capsys, "data", "from-folder", str(root), "--out", str(tmp_path / "kept"), "--keep-order", *common)
    assert code == 0 and "stored order kept" in out
    assert shard_captions(tmp_path / "kept") == [f"a {name}" for name in CLASSES for _ in range(12)]
    assert json.loads((tmp_path / "kept" / "shard-conversion.json").read_text())["shuffle_seed"] is None
    code, out = cli(capsys, "data", "inspect", str(tmp_path / "kept"), "--preset", "clip-tiny-test", "--out", "")
    assert code == 0 and "warning: consecutive samples look sorted by folder" in out
    code, out = cli(capsys, "data", "inspect", str(tmp_path / "s"), "--preset", "clip-tiny-test", "--out", "")
    assert code == 0 and "warning" not in out


def test_from_csv_shuffles_and_inspect_sees_sorted_captions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "img").mkdir()
    rows = ["filepath,caption"]
    for i in range(40):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(image_bytes(i))
        rows.append(f"img/{i}.jpg,a photo of a {CLASSES[i // 10]}")
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    code, out = cli(capsys, "data", "inspect", str(tmp_path / "rows.csv"), "--preset", "clip-tiny-test", "--out", "")
    assert code == 0 and "look sorted by folder" not in out and "look sorted by caption" in out
    code, out = cli(
        capsys, "data", "from-csv", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "s"), "--no-progress"
    )
    assert code == 0, out
    written = shard_captions(tmp_path / "s")
    assert sorted(written) == sorted(row.split(",")[1] for row in rows[1:]) and written != sorted(written)
    assert sum(a == b for a, b in itertools.pairwise(written)) < 20


def test_parts_sharing_interleaved_shards_split_samples_and_errors_exactly(tmp_path: Path) -> None:
    """Fewer shards than parts: every part reads every shard (interleaved alike) and keeps its share."""
    members = [[(f"s{s}k{i}.jpg", image_bytes(i)), (f"s{s}k{i}.txt", b"x")] for s in range(2) for i in range(5)]
    write_tar(tmp_path / "a.tar", [m for pair in members[:5] for m in pair])
    write_tar(tmp_path / "b.tar", [m for pair in members[5:] for m in pair], cut_in="s1k4.jpg")
    keys, errors = [], 0
    for part in range(3):
        for item in strided_samples(
            [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], Layout(3, 1, 1, 3), part, mixing_rng(0, 0, 0)
        ):
            if isinstance(item, SampleError):
                errors += 1
            elif not isinstance(item, PassEnd):
                keys.append(item["__key__"])
    assert sorted(keys) == sorted([f"s0k{i}" for i in range(5)] + [f"s1k{i}" for i in range(4)]) and errors == 1
