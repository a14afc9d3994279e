"""Sources, decoding and robustness: real tar shards and CSVs in a temp folder, exact counts."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmony.config import DataConfig
from harmony.data.csv_source import CsvSource
from harmony.data.decode import open_image
from harmony.data.errors import DataError, SampleError
from harmony.data.inspect import in_order, scan
from harmony.data.sources import ShardSource, caption_of, decode_sample, expand_urls, open_source
from tests.conftest import Cli, tiny

MAX_PIXELS = DataConfig().max_image_pixels


def image_bytes(seed: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """A JPEG whose header parses but whose data stops half way."""
    data = image_bytes(99, size=64)
    return data[: len(data) // 2]


def write_tar(path: Path, members: list[tuple[str, bytes]], cut_in: str | None = None) -> Path:
    """A real tar shard; with `cut_in`, the file ends half way through that member's data."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if cut_in is not None:
        raw = path.read_bytes()
        at = raw.index(cut_in.encode()) + 512 + 10  # header block, then 10 bytes of data
        path.write_bytes(raw[:at])
    return path


def good(key: str, seed: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", image_bytes(seed)), (f"{key}.txt", f"sample {key}".encode())]


def broken_shards(folder: Path) -> tuple[set[str], dict[str, int]]:
    """Three shards with every kind of problem; returns the usable keys and the expected skips."""
    folder.mkdir(parents=True, exist_ok=True)
    members = [
        *good("a0", 0),
        ("a1.jpg", truncated_jpeg()),  # corrupt JPEG: header fine, data truncated
        ("a1.txt", b"sample a1"),
        *good("a2", 2),
        ("a3.jpg", image_bytes(3)),  # missing caption
        *good("a4", 4),
        ("a5.png", image_bytes(5, fmt="PNG")),  # empty caption
        ("a5.txt", b"  \n"),
        ("a6.jpg", b""),  # empty image file
        ("a6.txt", b"sample a6"),
        ("a7.webp", image_bytes(7, fmt="WEBP")),  # caption only in img2dataset's json
        ("a7.json", b'{"caption": "sample a7", "status": "success"}'),
        ("a8.jpg", b"this is not an image"),
        ("a8.txt", b"sample a8"),
        *good("a9", 9),
    ]
    write_tar(folder / "s-00000.tar", members)
    write_tar(folder / "s-00001.tar", [*good("b0", 10), *good("b1", 11), *good("b2", 12)], cut_in="b2.jpg")
    (folder / "s-00002.tar").write_bytes(b"")  # an empty shard file
    usable = {"a0", "a2", "a4", "a7", "a9", "b0", "b1"}
    return usable, {"image": 3, "caption": 2, "shard": 2}


def test_one_pass_over_broken_shards_counts_exactly(tmp_path: Path) -> None:
    usable, skips = broken_shards(tmp_path / "shards")
    source = ShardSource(str(tmp_path / "shards"))
    assert len(source.urls) == 3
    assert source.epoch_size == 9 + 2  # an image and a caption file by name; the truncated shard: what it holds
    result = scan(in_order(source, MAX_PIXELS), limit=0, keep=100)
    assert {s.key for s in result.samples} == usable
    assert result.skipped == skips
    assert result.scanned == len(usable) + sum(skips.values())
    assert all(s.caption == f"sample {s.key}" for s in result.samples)


def test_decode_sample_rules() -> None:
    sample = decode_sample({"__key__": "k", "jpg": image_bytes(1), "txt": b" a cat \n", "json": b"{}"})
    assert sample.caption == "a cat" and sample.image.size == (24, 24)
    assert caption_of({"json": b'{"caption": "from json"}'}) == "from json"
    for bad, reason in [
        ({"__key__": "k", "txt": b"no image"}, "image"),
        ({"__key__": "k", "jpg": image_bytes(1)}, "caption"),
        ({"__key__": "k", "jpg": image_bytes(1), "json": b"not json"}, "caption"),
        ({"__key__": "k", "jpg": image_bytes(1), "txt": b""}, "caption"),
    ]:
        with pytest.raises(SampleError) as info:
            decode_sample(bad)
        assert info.value.reason == reason


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header (with a valid CRC) claims a huge size: a decompression bomb."""
    data = bytearray(image_bytes(0, size=8, fmt="PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = ihdr[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    bomb = png_claiming(200_000, 200_000)
    with pytest.raises(SampleError, match="refused") as info:
        open_image(bomb, MAX_PIXELS)
    assert info.value.reason == "image"
    just_over = png_claiming(9000, 8000)  # between PIL's limit and twice it: PIL would only warn
    with pytest.raises(SampleError, match="refused"):
        open_image(just_over, MAX_PIXELS)
    with pytest.raises(SampleError, match="refused"):
        decode_sample({"__key__": "bomb", "png": bomb, "txt": b"a bomb"})


def test_specs_that_match_nothing_fail_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for spec, message in [
        (str(tmp_path / "nothing-{000..003}.tar"), "matches no files"),
        (str(tmp_path / "*.tar"), "matches no files"),
        (str(tmp_path / "empty"), "holds no .tar shards"),
    ]:
        with pytest.raises(DataError, match=message):
            expand_urls(spec)
    (tmp_path / "x-0.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"holds no usable samples: .*empty file"):
        ShardSource(str(tmp_path / "x-0.tar"))
    with pytest.raises(DataError, match="epoch_size"):
        ShardSource("pipe:cat x.tar")


def write_csv(folder: Path, name: str = "pairs.csv", sep: str = ",") -> tuple[Path, list[int]]:
    """A CSV with good rows (nested relative paths), and rows with each problem; returns the bad rows."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(10):
        (folder / "img" / f"{i}.jpg").write_bytes(image_bytes(i))
        rows.append((f"img/{i}.jpg", f"sample {i}"))
    (folder / "img" / "corrupt.jpg").write_bytes(truncated_jpeg())
    (folder / "img" / "empty.jpg").write_bytes(b"")
    bad = [("img/missing.jpg", "sample m"), ("img/3.jpg", ""), ("img/corrupt.jpg", "sample c"), ("img/empty.jpg", "e")]
    positions = [1, 4, 7, 10]
    for position, row in zip(positions, bad):
        rows.insert(position, row)
    lines = [sep.join(["id", "filepath", "caption"])] + [sep.join([str(n), p, c]) for n, (p, c) in enumerate(rows)]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path, positions


def test_csv_rows_load_and_bad_rows_raise(tmp_path: Path) -> None:
    path, _ = write_csv(tmp_path)
    source = CsvSource(path, DataConfig())
    assert len(source) == 14
    loaded, reasons = [], []
    for index in range(len(source)):
        try:
            raw = source.load(index)
            open_image(source.image_path(index).read_bytes(), MAX_PIXELS).load()
            loaded.append(raw.caption)
        except (SampleError, OSError) as exc:
            reasons.append((index, getattr(exc, "reason", "image")))
    assert loaded == [f"sample {i}" for i in range(10)]
    assert reasons == [(1, "image"), (4, "caption"), (7, "image"), (10, "image")]
    tsv, _ = write_csv(tmp_path / "t", "pairs.tsv", sep="\t")
    assert isinstance(open_source(str(tsv), tiny("clip-tiny-test")), CsvSource)


def test_csv_problems_are_one_line_errors(tmp_path: Path) -> None:
    path, _ = write_csv(tmp_path)
    with pytest.raises(DataError, match="no column 'title'") as info:
        CsvSource(path, DataConfig(csv_caption_key="title"))
    assert "\n" not in str(info.value)
    assert len(CsvSource(path, DataConfig(csv_caption_key="id"))) == 14
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        CsvSource(tmp_path / "empty.csv", DataConfig())
    (tmp_path / "header.csv").write_text("filepath,caption\n")
    with pytest.raises(DataError, match="no rows"):
        CsvSource(tmp_path / "header.csv", DataConfig())
    with pytest.raises(DataError, match="csv_separator"):
        CsvSource(path, DataConfig(csv_separator="::"))


def test_cli_reports_a_csv_without_its_columns_in_one_line(tmp_path: Path, cli: Cli) -> None:
    path, _ = write_csv(tmp_path)
    proc = cli("data", "inspect", str(path), "--preset", "clip-tiny-test", "data.csv_caption_key=title")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no column 'title'" in proc.stderr


def test_dotted_keys_json_captions_and_blank_captions_read_alike_everywhere(tmp_path: Path, cli: Cli) -> None:
    """The counter that sizes an epoch, `harmony data inspect` and the loader read one shard the same way:
    keys with dots are samples of their own, captions only in img2dataset's JSON count, and a caption of
    control characters is empty."""
    from harmony.core.distributed import DistInfo
    from harmony.data.loader import build_train_data
    from harmony.data.views import view_maker_for

    folder = tmp_path / "s"
    folder.mkdir()
    dotted = [m for i in range(4) for m in [(f"img.00{i}.jpg", image_bytes(i)), (f"img.00{i}.txt", b"a dot")]]
    write_tar(folder / "d-0.tar", dotted)
    as_json = [
        m
        for i in range(4)
        for m in [(f"j{i}.webp", image_bytes(i, fmt="WEBP")), (f"j{i}.json", b'{"caption": "from json"}')]
    ]
    write_tar(folder / "d-1.tar", [*as_json, ("n0.jpg", image_bytes(9)), ("n0.txt", b"\x00\x00 \x1b")])
    source = ShardSource(str(folder))
    assert source.counts == [4, 5] and source.epoch_size == 9  # counted by name: the blank caption is found later
    proc = cli("data", "inspect", str(folder), "--preset", "clip-tiny-test", "--out", "")
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "9 samples with an image and a caption file" in out and "9 samples: 8 usable" in out
    cfg = tiny("clip-tiny-test", f"data_spec={folder}", "train.batch_size=8", "data.pin_memory=false")
    (batch,) = build_train_data(cfg, view_maker_for(cfg), DistInfo()).batches(0)
    assert batch["global"].shape[1] == 8 and batch["data_errors"].sum() == 1  # the blank caption


def test_inspect_of_a_set_without_one_usable_sample_fails(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "gone.csv").write_text("filepath,caption\nnope.jpg,a cat\nnone.jpg,a dog\n")
    proc = cli("data", "inspect", str(tmp_path / "gone.csv"), "--preset", "clip-tiny-test", "--out", "")
    assert proc.returncode == 1 and "none of the 2 samples read is usable" in proc.stderr


def test_urls_in_the_image_column_are_named_as_urls(tmp_path: Path, cli: Cli) -> None:
    """Nothing is downloaded: a table of URLs is refused in one line, a URL among local files is a skipped row
    that says so (not a mangled local path)."""
    (tmp_path / "a.jpg").write_bytes(image_bytes(1))
    (tmp_path / "urls.csv").write_text(
        "filepath,caption\nhttp://example.com/img0.jpg,a cat\nhttps://x.org/1.png,a dog\n"
    )
    (tmp_path / "mixed.csv").write_text("filepath,caption\na.jpg,a cat\nhttp://example.com/img0.jpg,a dog\n")
    with pytest.raises(DataError, match=r"holds URLs .*'http://example\.com/img0\.jpg'.* downloads nothing"):
        CsvSource(tmp_path / "urls.csv", DataConfig())
    source = CsvSource(tmp_path / "mixed.csv", DataConfig())
    with pytest.raises(
        SampleError, match=r"row 2: 'http://example.com/img0.jpg' is a URL \(images are not downloaded\)"
    ):
        source.load(1)
    proc = cli("data", "from-csv", str(tmp_path / "urls.csv"), "--out", str(tmp_path / "s"), "--no-progress")
    assert proc.returncode == 1 and "holds URLs" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = cli("data", "from-csv", str(tmp_path / "mixed.csv"), "--out", str(tmp_path / "m"), "--no-progress")
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "is a URL" in said and "http:/example" not in said
