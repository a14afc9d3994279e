"""The shared primitives behind 'no silent wrong numbers': writable outputs and transparency."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from harmony.core.colors import parse_background
from harmony.data.rgb import to_rgb
from harmony.outputs import OutputError, check_output_dir, check_output_file


def test_transparent_pixels_composite_on_the_background_not_black() -> None:
    drawing = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    drawing.putpixel((3, 3), (200, 10, 10, 255))
    drawing.putpixel((4, 4), (0, 0, 200, 128))
    rgb = to_rgb(drawing)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((3, 3)) == (200, 10, 10)
    r, g, b = rgb.getpixel((4, 4))
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and abs(b - 227) <= 1
    assert to_rgb(drawing, (0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_palette_and_grey_alpha_images_keep_their_transparency(mode: str) -> None:
    if mode == "P":
        image = Image.new("P", (4, 4), 1)
        image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
        image.info["transparency"] = 1
    else:
        image = Image.new("LA", (4, 4), (0, 0))
    assert to_rgb(image).getpixel((1, 1)) == (255, 255, 255)


def test_opaque_images_convert_as_before() -> None:
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == cmyk.convert("RGB").getpixel((0, 0))
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(rgb) is rgb


def test_parse_background() -> None:
    assert parse_background("white") == (255, 255, 255)
    assert parse_background("#102030") == (16, 32, 48)
    assert parse_background("1, 2, 3") == (1, 2, 3)
    with pytest.raises(ValueError, match="not a colour"):
        parse_background("256,0,0")


def test_output_checks_refuse_paths_under_a_file_and_create_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="which is a file"):
        check_output_dir(blocker / "run")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(blocker)
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path)
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    assert check_output_file(tmp_path / "c" / "r.json").name == "r.json"


def test_output_file_messages_name_the_path_given(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(
        OutputError, match=r"--json .*file.txt/r.json: lies under .*file.txt, which is a file; give a file"
    ):
        check_output_file(blocker / "r.json", flag="--json")
