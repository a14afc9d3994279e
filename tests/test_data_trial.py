"""A new user's messy files: transparent, palette, 16-bit, CMYK and EXIF-rotated images, captions in other
encodings, and CSVs written by other tools, through the training loader, the converters and inspect."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmony.config import ConfigError, DataConfig
from harmony.core.distributed import DistInfo
from harmony.data.convert import EncodeOptions, Pending, encode, folder_pairs
from harmony.data.csv_source import CsvSource
from harmony.data.decode import decode_pixels, open_image, upright_size
from harmony.data.errors import DataError, SampleError
from harmony.data.loader import build_train_data
from harmony.data.views import view_maker_for
from harmony.presets import build_config
from tests.test_data_loader import config
from tests.test_data_sources import MAX_PIXELS, write_tar

PLAIN = ("data.augment.color_jitter=0", "data.augment.grayscale=0", "data.augment.global_solarize=[0,0]")


def encoded(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def transparent_images() -> dict[str, bytes]:
    """Fully transparent canvases in the modes PIL's convert('RGB') turns black."""
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    return {
        "rgba.png": encoded(Image.new("RGBA", (32, 32), (0, 0, 0, 0))),
        "la.png": encoded(Image.new("LA", (32, 32), (0, 0))),
        "pal.png": encoded(palette, transparency=0),
        "alpha.webp": encoded(Image.new("RGBA", (32, 32), (0, 0, 0, 0)), "WEBP", lossless=True),
    }


@pytest.mark.parametrize(("setting", "colour"), [(None, (255, 255, 255)), ("#ff8000", (255, 128, 0))])
def test_transparent_images_reach_training_on_the_configured_background(
    tmp_path: Path, setting: str | None, colour: tuple[int, int, int]
) -> None:
    members = []
    for i, (name, data) in enumerate(transparent_images().items()):
        members += [(f"k{i}.{name.split('.')[1]}", data), (f"k{i}.txt", f"transparent {name}".encode())]
    write_tar(tmp_path / "t-00000.tar", members)
    extra = () if setting is None else (f"data.alpha_background={setting}",)
    cfg = config(tmp_path / "t-00000.tar", "train.batch_size=4", "data.num_workers=0", *PLAIN, *extra)
    batch = next(build_train_data(cfg, view_maker_for(cfg), DistInfo()).batches(0))
    pixels = batch["global"].permute(0, 1, 3, 4, 2).reshape(-1, 3)  # every pixel of every crop
    assert (pixels == torch_colour(colour)).all(), pixels.unique(dim=0)


def torch_colour(colour: tuple[int, int, int]) -> object:
    import torch

    return torch.tensor(colour, dtype=torch.uint8)


def test_alpha_background_is_validated_with_its_key() -> None:
    assert build_config("clip-tiny-test", ["data.alpha_background=10,20,30"]).data.alpha_background == "10,20,30"
    with pytest.raises(ConfigError, match=r"config key 'data\.alpha_background'"):
        build_config("clip-tiny-test", ["data.alpha_background=purple"])


def test_sixteen_bit_cmyk_and_grey_images_keep_their_values() -> None:
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)[None].repeat(8, 0)
    pixels, _ = decode_pixels(open_image(encoded(Image.fromarray(ramp)), MAX_PIXELS), [])
    assert pixels.shape == (8, 64, 3) and np.abs(pixels[0, :, 0].astype(int) - (ramp[0] >> 8)).max() <= 1
    cmyk, _ = decode_pixels(open_image(encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), MAX_PIXELS), [])
    assert cmyk[4, 4, 0] > 240 and cmyk[4, 4, 1] < 20 and cmyk[4, 4, 2] < 20  # red stays red
    grey, _ = decode_pixels(open_image(encoded(Image.new("L", (8, 8), 77), "JPEG"), MAX_PIXELS), [])
    assert np.abs(grey.astype(int) - 77).max() <= 1


def rotated_jpeg() -> bytes:
    """A 60x30 camera JPEG stored sideways: blue on the stored left, EXIF 6 (rotate 90 degrees clockwise)."""
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 15, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_rotated_photos_are_seen_upright(tmp_path: Path) -> None:
    image = open_image(rotated_jpeg(), MAX_PIXELS)
    assert image.size == (60, 30) and upright_size(image) == (30, 60)
    pixels, factor = decode_pixels(image, [])
    assert pixels.shape == (60, 30, 3) and factor == (1.0, 1.0)
    assert pixels[3, 15, 2] > 200 and pixels[-3, 15, 0] > 200  # blue on top, red below
    (tmp_path / "rot.jpg").write_bytes(rotated_jpeg())
    files = encode(Pending("rot.jpg", tmp_path / "rot.jpg", "a photo"), EncodeOptions())
    assert not isinstance(files, SampleError)
    meta = json.loads(files["json"])
    assert (meta["width"], meta["height"]) == (30, 60)
    stored = Image.open(io.BytesIO(files["jpg"]))
    assert stored.size == (30, 60) and stored.getexif().get(0x0112, 1) == 1  # written upright, no EXIF turn
    assert np.asarray(stored)[3, 15, 2] > 200


def test_conversion_composites_transparency_and_reads_caption_encodings(tmp_path: Path) -> None:
    root = tmp_path / "photos" / "cat"
    root.mkdir(parents=True)
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.save(root / "clear.gif", transparency=0)  # GIF is re-encoded as JPEG
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(root / "big.png")  # resized: re-encoded as JPEG
    (root / "big.txt").write_bytes("un café noir".encode("cp1252"))
    (root / "clear.txt").write_bytes("\ufeffa bom caption".encode())
    pairs = folder_pairs(tmp_path / "photos")
    assert {p.caption for p in pairs} == {"un café noir", "a bom caption"}
    for pending in pairs:
        files = encode(pending, EncodeOptions(resize=32, background=(0, 0, 255)))
        assert not isinstance(files, SampleError) and "jpg" in files
        pixels = np.asarray(Image.open(io.BytesIO(files["jpg"])).convert("RGB")).astype(int)
        assert np.abs(pixels - [0, 0, 255]).max() < 8, pending.name  # the chosen background, not black


def test_csvs_written_by_other_tools(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    tables = {
        "open_clip.tsv": ("filepath\ttitle\nimg/0.png\ta red thing\n", {"csv_caption_key": "title"}),
        "pandas.csv": (',filepath,caption\n0,img/0.png,"a cat, sitting\nand sleeping"\n', {}),
        "excel.csv": ('\ufefffilepath,caption\r\nimg/0.png,"x, y"\r\nimg\\1.png,  spaced\r\n', {}),
        "spaced.csv": ('filepath, caption\nimg/2.png, "a, b"\n', {}),
    }
    expected = {
        "open_clip.tsv": [("img/0.png", "a red thing")],
        "pandas.csv": [("img/0.png", "a cat, sitting\nand sleeping")],
        "excel.csv": [("img/0.png", "x, y"), ("img/1.png", "spaced")],
        "spaced.csv": [("img/2.png", "a, b")],
    }
    for name, (text, keys) in tables.items():
        (tmp_path / name).write_bytes(text.encode())
        source = CsvSource(tmp_path / name, DataConfig(**keys))
        rows = [(source.image_path(i), source.load(i).caption) for i in range(len(source))]
        assert [(p.relative_to(tmp_path).as_posix(), c) for p, c in rows] == expected[name], name
        assert all(p.is_file() for p, _ in rows)


def test_csv_mistakes_name_the_columns_and_both_settings(tmp_path: Path) -> None:
    (tmp_path / "a.tsv").write_text("filepath\ttitle\nx.png\tcat\n")
    with pytest.raises(DataError) as info:
        CsvSource(tmp_path / "a.tsv", DataConfig())
    message = str(info.value)
    assert "no column 'caption'" in message and "'filepath', 'title'" in message
    assert "data.csv_caption_key=COL" in message and "--caption-key COL" in message
    (tmp_path / "tabs.csv").write_text("filepath\tcaption\nx.png\tcat\n")
    with pytest.raises(DataError, match=r"looks tab-separated: data\.csv_separator=tab .* --separator tab"):
        CsvSource(tmp_path / "tabs.csv", DataConfig())
    (tmp_path / "latin.csv").write_bytes("filepath,caption\nx.png,ok\nx.png,café\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"is not UTF-8 \(byte 0xe9 on line 3\)"):
        CsvSource(tmp_path / "latin.csv", DataConfig())


def test_converted_messy_folder_trains(tmp_path: Path) -> None:
    """Every kind of file above in one class folder -> shards -> two training steps."""
    from harmony.train.loop import train

    root = tmp_path / "photos" / "fox"
    root.mkdir(parents=True)
    for name, data in transparent_images().items():
        (root / name).write_bytes(data)
    (root / "rot.jpg").write_bytes(rotated_jpeg())
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(root / "g16.png")
    (root / "zero.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image")
    from harmony.data.convert import write_shards

    report = write_shards(folder_pairs(tmp_path / "photos", "a {label}"), tmp_path / "s", progress=False)
    assert report.samples == 6 and report.skipped["image"] == 2
    assert report.first_problem in (
        "fox/zero.jpg: empty image file (0 bytes)",
        "fox/notes.jpg: not an image file (starts with b'not an i')",
    )
    with tarfile.open(report.shards[0]) as tar:
        assert len([m for m in tar.getnames() if m.endswith(".txt")]) == 6
    cfg = config(tmp_path / "s", "train.batch_size=3", "train.max_steps=2", "train.device=cpu", "data.num_workers=0")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 2 and np.isfinite(result.last_metrics["loss"])


def test_an_interrupted_writer_leaves_no_partial_shard_that_looks_whole(tmp_path: Path) -> None:
    from harmony.data.shards import ShardWriter

    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path, per_shard=2) as writer:
        for i in range(3):
            writer.write(f"{i:03d}", {"txt": b"a caption"})
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.tar"]  # the full one; no tmp left
    with ShardWriter(tmp_path / "ok", per_shard=2) as writer:
        for i in range(3):
            writer.write(f"{i:03d}", {"txt": b"a caption"})
    assert len(writer.shards) == 2


def test_a_folder_name_that_is_not_utf8_becomes_a_readable_label(tmp_path: Path) -> None:
    import os

    folder = os.path.join(os.fsencode(tmp_path / "photos"), b"caf\xe9")  # a Latin-1 name from an old archive
    os.makedirs(folder)
    Image.new("RGB", (8, 8)).save(os.fsdecode(os.path.join(folder, b"x.png")))
    (pending,) = folder_pairs(tmp_path / "photos", "a {label}")
    assert pending.caption == "a café" and pending.name == "café/x.png"
    files = encode(pending, EncodeOptions())
    assert not isinstance(files, SampleError) and files["txt"] == "a café".encode()
