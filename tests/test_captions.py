"""Captions as users write them: a cut at the context never splits a character, ids equal open_clip's
elsewhere, a caption of control characters is empty, and a set whose captions are all the same is named."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from harmony.data.shard_reader import clean_caption
from harmony.models.tokenizer import CaptionTokenizer
from tests.conftest import Cli
from tests.test_data_sources import image_bytes

CJK = "一只猫坐在红色的垫子上看着窗外的鸟儿飞过天空，然后跳下来 🐈‍⬛ 吃饭"


@pytest.mark.parametrize("context", range(4, 40))
def test_a_cut_caption_keeps_whole_characters(context: int) -> None:
    tokenizer = CaptionTokenizer(context)
    ids = tokenizer(CJK)[0]
    text = tokenizer.decode(ids)
    assert "\ufffd" not in text and CJK.startswith(text.replace(" ", ""))
    assert int(tokenizer.real_positions(ids).sum()) <= context and ids[0] == tokenizer.sot_id


def test_ids_equal_open_clips_where_no_character_is_cut() -> None:
    captions = ["a photo of a dog", "two blue circles " * 40, "Ünïcödé ‘quotes’ — dash", "一只猫", "wow !$"]
    assert torch.equal(CaptionTokenizer(77)(captions), open_clip.get_tokenizer("ViT-B-32")(captions))


def test_control_characters_are_no_caption() -> None:
    assert clean_caption("\x00\x00 \x1b\t\n") == "" and clean_caption(" a\x00cat\n") == "a cat"


def test_a_set_of_one_caption_is_named_by_inspect_and_training(tmp_path: Path, cli: Cli) -> None:
    lines = ["filepath,caption"]
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i, fmt="PNG"))
        lines.append(f"{i}.png,a photo")
    (tmp_path / "same.csv").write_text("\n".join(lines) + "\n")
    proc = cli("data", "inspect", str(tmp_path / "same.csv"), "--preset", "clip-tiny-test", "--out", "")
    assert proc.returncode == 0 and "all 8 captions read 'a photo'" in proc.stdout
    args = ["train", "--preset", "clip-tiny-test", "--data", str(tmp_path / "same.csv"), "--max-steps", "1"]
    proc = cli(*args, "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-progress", "--workers", "0")
    assert proc.returncode == 0 and "all 4 captions of the first batch read 'a photo'" in proc.stdout


def test_utf16_and_cp1252_caption_files_read_as_text(tmp_path: Path) -> None:
    from harmony.data.shard_reader import caption_of

    assert caption_of({"txt": "a café".encode("utf-16")}) == "a café"
    assert caption_of({"txt": "a café".encode("cp1252")}) == "a café"
    assert caption_of({"txt": "\ufeffa café".encode()}) == "a café"
