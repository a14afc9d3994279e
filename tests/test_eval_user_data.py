"""`harmony eval` on a user's own data: flags read as given, folders read as a user means them, unreadable and
transparent images, outputs that cannot be written, k-NN's k."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from harmony.cli import build_parser, main
from harmony.data.shapes import ShapesDataset
from harmony.eval.cli import parse_data_for, parse_sets
from harmony.eval.datasets import extract, open_labelled
from harmony.eval.knn import run_knn
from harmony.eval.suite import PROTOCOLS
from harmony.loading import load
from tests.conftest import Cli

SAMPLE = {int: ("3", "3,4"), float: ("0.5", "0.25,0.5"), str: ("cls+avg", "linear,fpn")}


def drawing(size: int = 48, background: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Image.Image:
    """A red disc and a blue bar on a (by default fully transparent) RGBA canvas."""
    image = Image.new("RGBA", (size, size), background)
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 30, 30), fill=(220, 30, 30, 255))
    draw.rectangle((20, 34, 44, 42), fill=(30, 30, 220, 255))
    return image


def class_folder(root: Path, per_class: int = 3, classes: tuple[str, ...] = ("circle", "square")) -> Path:
    """`root/<class>/<i>.png` from the built-in shapes, the class folder names as given."""
    ds = ShapesDataset("val", 40, 32)
    made = {name: 0 for name in classes}
    for i in range(40):
        name = classes[i % len(classes)]
        if made[name] < per_class:
            (root / name).mkdir(parents=True, exist_ok=True)
            ds[i].image.save(root / name / f"{i}.png")
            made[name] += 1
    return root


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- 1. list-valued flags --------------------------------------------------------------------------


def test_every_settings_flag_keeps_a_single_value_and_parses_a_comma_list() -> None:
    parser = build_parser("eval")
    checked = 0
    for task, protocol in PROTOCOLS.items():
        base = ["eval", task, "--checkpoint", "c.pt", "--data", "d"]
        for f in fields(protocol.defaults):
            default, flag = getattr(protocol.defaults, f.name), "--" + f.name.replace("_", "-")
            if isinstance(default, tuple):
                kind = type(default[0])
                one, two = SAMPLE[kind]
                assert getattr(parser.parse_args([*base, flag, one]), f.name) == (kind(one),), flag
                assert getattr(parser.parse_args([*base, flag, two]), f.name) == tuple(map(kind, two.split(","))), flag
                with pytest.raises(SystemExit):
                    parser.parse_args([*base, flag, ","])
                checked += 1
            elif isinstance(default, str):
                assert getattr(parser.parse_args([*base, flag, "openai"]), f.name) == "openai", flag
    assert (
        checked == 10
    )  # ks x2, lrs, n_last_blocks, pooling, crop_scale, protocols, scale_range, decay_at, train_sizes
    assert parse_sets(["zeroshot.templates=openai", "knn.ks=5", "linear.pooling=cls+avg"]) == {
        "zeroshot": {"templates": "openai"},
        "knn": {"ks": (5,)},
        "linear": {"pooling": ("cls+avg",)},
    }
    assert parse_data_for(["segment=ade/images/validation"]) == {"segment": "ade/images/validation"}
    for bad in ("segment", "segment=", "segmentation=x"):
        with pytest.raises(ValueError, match="data-for"):
            parse_data_for([bad])


def test_zeroshot_template_and_classname_flags_reach_the_json(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    """`--templates openai` was split into ['o','p','e','n','a','i'] and the JSON said 'default'."""
    from open_clip import zero_shot_metadata as meta

    data = class_folder(tmp_path / "val", classes=("signs_and_symbols", "red-circle"))
    out = tmp_path / "zs.json"
    args = ["eval", "zeroshot", "--checkpoint", str(clip_checkpoint), "--data", str(data), "--workers", "0"]
    proc = cli(*args, "--templates", "openai", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["settings"]["templates"] == "openai"
    assert len(result["templates"]) == len(meta.OPENAI_IMAGENET_TEMPLATES) and "{}" in result["templates"][0]
    assert result["dataset"]["class_names"] == ["red-circle", "signs_and_symbols"]
    assert result["dataset"]["prompt_names"] == ["red circle", "signs and symbols"]

    (tmp_path / "names.txt").write_text("a red disc\nsigns\n")
    (tmp_path / "templates.txt").write_text("a photo of {}.\n{} drawn\n")
    names, templates = str(tmp_path / "names.txt"), str(tmp_path / "templates.txt")
    proc = cli(*args, "--templates", templates, "--classnames", names, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["settings"]["templates"] == templates and result["settings"]["classnames"] == names
    assert result["templates"] == ["a photo of {}.", "{} drawn"]
    assert result["dataset"]["prompt_names"] == ["a red disc", "signs"]

    proc = cli(*args, "--templates", "opnai")
    assert proc.returncode == 2 and "neither a named set" in one_error_line(proc.stderr)


def test_eval_all_passes_string_settings_whole(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    proc = cli(
        "eval", "all", "--checkpoint", str(clip_checkpoint), "--data", "builtin:shapes:val", "--workers", "0",
        "--tasks", "zeroshot", "--set", "zeroshot.templates=simple", "--out", str(tmp_path / "suite"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [result] = [json.loads(p.read_text()) for p in (tmp_path / "suite").glob("*/zeroshot.json")]
    assert result["settings"]["templates"] == "simple" and len(result["templates"]) == 7


# --- 3. no command picks the data for the user -----------------------------------------------------


@pytest.mark.parametrize("task", [*PROTOCOLS, "all"])
def test_every_eval_command_requires_data(task: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser("eval").parse_args(["eval", task, "--checkpoint", "c.pt"])
    assert exit_info.value.code == 2 and "--data" in capsys.readouterr().err


# --- 4. unreadable images --------------------------------------------------------------------------


def messy_folder(root: Path) -> Path:
    """Two classes of 3 good images, 4 unreadable files, and junk that is not data at all."""
    class_folder(root)
    (root / "circle" / "empty.png").write_bytes(b"")
    (root / "square" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    Image.new("1", (8200, 8200)).save(root / "square" / "bomb.png")  # 67 M pixels, a few kB
    good = (root / "circle" / next(p.name for p in (root / "circle").iterdir() if p.stat().st_size)).read_bytes()
    (root / "circle" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "circle" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "circle" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "square" / ".thumbs").mkdir()
    (root / "square" / ".thumbs" / "t.png").write_bytes(b"")
    return root


def test_unreadable_images_are_skipped_counted_and_reported(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    """A zero-byte, undecodable, truncated or oversized image gave a 60-line traceback."""
    data = messy_folder(tmp_path / "val")
    out = tmp_path / "r.json"
    common = ["--checkpoint", str(clip_checkpoint), "--data", str(data), "--workers", "0", "--out", str(out)]
    env = {"HARMONY_CACHE": str(tmp_path / "cache")}
    proc = cli("eval", "zeroshot", *common)
    assert proc.returncode == 0, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith("harmony eval zeroshot: skipped 4 unreadable sample(s)") and "(4 image;" in line
    dataset = json.loads(out.read_text())["dataset"]
    assert dataset["class_names"] == ["circle", "square"] and dataset["num_images"] == 6
    assert dataset["skipped"]["count"] == 4 and dataset["skipped"]["reasons"] == {"image": 4}
    for _ in range(2):  # the second run reads the features (and what was skipped) from the cache
        proc = cli("eval", "knn", *common, "--train", str(data), "--ks", "2", env=env)
        assert proc.returncode == 0, proc.stderr
        assert "skipped 8 unreadable" in one_error_line(proc.stderr)  # 4 in each split
        result = json.loads(out.read_text())
        assert result["dataset"]["num_train"] == result["dataset"]["num_images"] == 6
        assert result["dataset"]["skipped"]["count"] == 8


def test_a_folder_of_only_unreadable_images_is_one_error(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "x.png").write_bytes(b"")
    proc = cli("eval", "zeroshot", "--checkpoint", str(clip_checkpoint), "--data", str(tmp_path / "val"))
    assert proc.returncode == 1 and "no readable image" in one_error_line(proc.stderr)


# --- 5. transparency -------------------------------------------------------------------------------


def on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def test_transparent_images_are_features_of_the_drawing_on_white(tmp_path: Path, clip_checkpoint: Path) -> None:
    """convert('RGB') turned a transparent canvas black: a drawing's features depended on its alpha."""
    pretrained = load(clip_checkpoint)
    palette = Image.new("P", (48, 48), 0)
    palette.putpalette([0, 0, 0, 220, 30, 30] + [0] * 762)
    ImageDraw.Draw(palette).ellipse((6, 6, 30, 30), fill=1)
    palette.info["transparency"] = 0
    transparent = [drawing(), drawing().convert("LA"), palette]  # RGBA, grey + alpha, palette + transparent index
    for i, image in enumerate(transparent):
        for folder, saved in (("transparent", image), ("white", on_white(image))):
            (tmp_path / folder / "x").mkdir(parents=True, exist_ok=True)
            saved.save(tmp_path / folder / "x" / f"{i}.png", **({"transparency": 0} if saved.mode == "P" else {}))
    assert Image.open(tmp_path / "transparent" / "x" / "2.png").info.get("transparency") == 0
    encode = pretrained.model.encode_image

    def features(name: str, background: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
        data = open_labelled(str(tmp_path / name), pretrained.config, background)
        return extract(encode, data, pretrained.image_size, torch.device("cpu"), 8, 0)[0]

    white = features("white")
    assert torch.equal(features("transparent"), white)
    black = features("transparent", (0, 0, 0))
    assert all(not torch.allclose(black[i], white[i], atol=1e-3) for i in range(3))


def test_alpha_background_flag_is_used_and_recorded(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    (tmp_path / "val" / "x").mkdir(parents=True)
    drawing().save(tmp_path / "val" / "x" / "0.png")
    out = tmp_path / "zs.json"
    args = ["eval", "zeroshot", "--checkpoint", str(clip_checkpoint), "--data", str(tmp_path / "val")]
    proc = cli(*args, "--workers", "0", "--alpha-background", "#000000", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["settings"]["alpha_background"] == "0,0,0"
    proc = cli(*args, "--alpha-background", "transparent")
    assert proc.returncode == 2 and "--alpha-background" in proc.stderr and "Traceback" not in proc.stderr


# --- 6. outputs checked before any work ------------------------------------------------------------


@pytest.mark.parametrize(
    "task, flag, path",
    [
        ("zeroshot", "--out", "file/r.json"),
        ("knn", "--out", "file/deeper/r.json"),
        ("attention", "--maps", "file/maps"),
        ("all", "--out", "file/report"),
    ],
)
def test_unwritable_output_is_one_line_before_any_work(
    task: str, flag: str, path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished evaluation was lost to a traceback when --out lay under a regular file."""
    (tmp_path / "file").write_text("not a folder")
    missing = str(tmp_path / "no-such-checkpoint.pt")  # the output is checked before the checkpoint is loaded
    code = main(["eval", task, "--checkpoint", missing, "--data", "builtin:shapes:val", flag, str(tmp_path / path)])
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"harmony: error: {flag} {tmp_path}") and "is a file" in line


# --- 7. k-NN's k -----------------------------------------------------------------------------------


def test_knn_refuses_non_positive_k(capsys: pytest.CaptureFixture[str], clip_checkpoint: Path) -> None:
    code = main(["eval", "knn", "--checkpoint", str(clip_checkpoint), "--data", "builtin:shapes:val", "--ks", "0,-1"])
    assert code == 2 and "positive" in one_error_line(capsys.readouterr().err)


def test_knn_caps_k_at_the_training_set_and_records_it(
    tmp_path: Path, clip_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """k above the training set's size was silently capped while the metric kept the asked-for k's name."""
    pretrained = load(clip_checkpoint)
    result = run_knn(
        pretrained, "builtin:shapes:val", torch.device("cpu"), cache_dir=tmp_path, num_workers=0,
        ks=(5, 1000, 2000), max_train=40,
    )  # fmt: skip
    assert result["ks_used"] == [5, 40] and result["settings"]["ks"] == (5, 1000, 2000)
    assert set(result["metrics"]) == {"k5_top1", "k5_top5", "k40_top1", "k40_top5", "chance"}
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        "harmony eval knn: warning: k=1000 is more than the 40 training images; using k=40",
        "harmony eval knn: warning: k=2000 is more than the 40 training images; using k=40",
    ]


# --- 8. retrieval on a user's CSV or shards --------------------------------------------------------


def captioned_images(folder: Path, count: int = 4) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    ds = ShapesDataset("val", count, 32)
    for i in range(count):
        ds[i].image.save(folder / f"{i}.jpg")
    return [ds[i].caption for i in range(count)]


def test_retrieval_reads_a_csv_with_other_column_names(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    """A CSV from another tool (`image;text`, a row without caption, a zero-byte image) could not be read."""
    captions = captioned_images(tmp_path / "img")
    (tmp_path / "img" / "empty.jpg").write_bytes(b"")
    rows = [f"img/{i}.jpg;{c}" for i, c in enumerate(captions)] + ["img/0.jpg;", "img/empty.jpg;nothing here"]
    (tmp_path / "pairs.csv").write_text("id_unused;image;text\n" + "\n".join(f"x;{r}" for r in rows) + "\n")
    out = tmp_path / "r.json"
    args = ["eval", "retrieval", "--checkpoint", str(clip_checkpoint), "--data", str(tmp_path / "pairs.csv")]
    proc = cli(*args, "--workers", "0", "--image-key", "image", "--caption-key", "text", "--separator", ";", "--ks", "1,2",
                   "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 unreadable sample(s)" in one_error_line(proc.stderr)
    result = json.loads(out.read_text())
    assert result["dataset"]["num_images"] == 4 and result["dataset"]["num_captions"] == 4
    assert result["dataset"]["skipped"]["reasons"] == {"caption": 1, "image": 1}
    assert result["settings"]["caption_key"] == "text" and result["settings"]["image_key"] == "image"
    proc = cli(*args)  # the default column names are not there: one line that names the flags
    assert proc.returncode == 1 and "--caption-key" in one_error_line(proc.stderr)


def test_retrieval_reads_webdataset_shards(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    import io
    import tarfile

    captions = captioned_images(tmp_path / "img", 5)
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
        members = [(f"{i:04d}.jpg", (tmp_path / "img" / f"{i}.jpg").read_bytes()) for i in range(5)]
        members += [(f"{i:04d}.txt", c.encode()) for i, c in enumerate(captions)]
        members += [("0005.jpg", b"broken"), ("0005.txt", b"a broken image")]
        for name, payload in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "r.json"
    proc = cli("eval", "retrieval", "--checkpoint", str(clip_checkpoint), "--data", str(tmp_path / "shards"),
                   "--workers", "0", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "with 5 images, text->image recall@5,10 is 1 by construction" in proc.stderr
    result = json.loads(out.read_text())
    assert result["dataset"]["num_images"] == result["dataset"]["num_captions"] == 5
    assert result["dataset"]["skipped"]["count"] == 1 and "0005" in result["dataset"]["skipped"]["examples"][0]


# --- 9. attention says where its pictures are; every flag explains itself ---------------------------


def test_attention_prints_where_the_maps_are(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    proc = cli("eval", "attention", "--checkpoint", str(clip_checkpoint), "--data", "builtin:shapes:val",
                   "--workers", "0", "--num-images", "1", "--max-eval", "2", "--maps", str(tmp_path / "m"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("maps: ")]
    files = line.removeprefix("maps: ").split(", ")
    assert files == [str(tmp_path / "m" / "attention.png"), str(tmp_path / "m" / "similarity.png")]
    assert all(Path(f).stat().st_size > 1000 for f in files)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line(clip_checkpoint: Path, cli: Cli) -> None:
    proc = cli("eval", "zeroshot", "--checkpoint", str(clip_checkpoint), "--data", "builtin:shapes:val",
               "--device", "cuda")  # fmt: skip
    assert proc.returncode == 2 and "no usable CUDA device" in one_error_line(proc.stderr)


def test_attention_prompts_read_folder_names_as_words(tmp_path: Path, clip_checkpoint: Path, cli: Cli) -> None:
    data = class_folder(tmp_path / "val", per_class=1, classes=("signs_and_symbols",))
    out = tmp_path / "a.json"
    proc = cli("eval", "attention", "--checkpoint", str(clip_checkpoint), "--data", str(data), "--workers", "0",
               "--num-images", "1", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["dataset"]["prompts"] == ["a photo of a signs and symbols."]


def test_every_eval_flag_has_help() -> None:
    import argparse

    def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return dict(action.choices)

    for task, parser in subparsers(subparsers(build_parser("eval"))["eval"]).items():
        for action in parser._actions:
            assert action.help and not action.help.startswith("["), (task, action.option_strings)
