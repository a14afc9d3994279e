"""`harmony data ...` and `harmony bench data` flags: mistakes end in one line before any work, list flags
parse as lists, outputs are checked first, and what was used is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from harmony.cli import build_parser, main
from harmony.data.throughput import worker_counts
from tests.test_data_sources import image_bytes


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`harmony ARGS` in this process: status, stdout, stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def folder(root: Path) -> Path:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 10), (80 * i, 0, 0)).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["synth", "--num", "-5"], 2, "--num must be positive, got -5"),
        (["synth", "--num", "5", "--shard-size", "0"], 2, "--shard-size must be positive, got 0"),
        (["synth", "--image-size", "-1"], 2, "--image-size must be >= 0, got -1"),
        (["synth", "--mismatch-rate", "1.5"], 2, "--mismatch-rate must be in [0, 1]"),
        (
            ["from-folder", "{photos}", "--caption-template", "a {lable}"],
            2,
            "has the placeholder {lable}; the only one is {label}",
        ),
        (["from-folder", "{photos}", "--caption-template", "a {"], 2, "Single '{' encountered"),
        (["from-folder", "{photos}", "--shard-size", "-2"], 2, "--shard-size must be positive, got -2"),
        (["from-folder", "{photos}", "--workers", "-1"], 2, "--workers must be >= 0"),
        (["from-folder", "{photos}", "--resize", "-3"], 2, "--resize must be >= 0"),
        (["from-folder", "{photos}", "--quality", "0"], 2, "--quality must be in 1..100"),
        (
            ["from-folder", "{photos}", "--alpha-background", "purple"],
            2,
            "--alpha-background: 'purple' is not a colour",
        ),
        (["from-folder", "{photos}", "--prefix", "a/b"], 2, "--prefix must be a plain file name prefix"),
        (["from-csv", "{rows}", "--shard-size", "0"], 2, "--shard-size must be positive"),
    ],
)
def test_flag_mistakes_end_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, message: str
) -> None:
    photos = folder(tmp_path / "photos")
    (tmp_path / "rows.csv").write_text("filepath,caption\ncat/0.png,a cat\n")
    paths = {"{photos}": str(photos), "{rows}": str(tmp_path / "rows.csv")}
    argv = ["data", *(paths.get(a, a) for a in args), "--out", str(tmp_path / "out"), "--no-progress"]
    status, _, err = run(capsys, *argv)
    assert status == code and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("command", ["synth", "from-csv", "from-folder", "inspect-sheet", "inspect-json"])
def test_unwritable_out_is_refused_before_the_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    photos = folder(tmp_path / "photos")
    (tmp_path / "rows.csv").write_text("filepath,caption\nphotos/cat/0.png,a cat\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = str(blocker / "below")
    argv = {
        "synth": ["synth", "--num", "4", "--out", bad],
        "from-csv": ["from-csv", str(tmp_path / "rows.csv"), "--out", bad],
        "from-folder": ["from-folder", str(photos), "--caption-template", "a {label}", "--out", bad],
        "inspect-sheet": ["inspect", "builtin:shapes", "--preset", "clip-tiny-test", "--out", bad + "/s.png"],
        "inspect-json": [
            "inspect",
            "builtin:shapes",
            "--preset",
            "clip-tiny-test",
            "--out",
            "",
            "--json",
            bad + ".json",
        ],
    }[command]
    status, out, err = run(capsys, "data", *argv)
    flag = "--json" if command == "inspect-json" else "--out"
    assert status == 1 and err.count("\n") == 1 and f"error: {flag} " in err and "file" in err, err
    assert out == ""  # nothing was scanned or written before the refusal


def test_existing_shards_are_not_mixed_with_new_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = folder(tmp_path / "photos")
    out = tmp_path / "out"
    base = ["data", "from-folder", str(photos), "--caption-template", "a {label}", "--out", str(out), "--no-progress"]
    assert run(capsys, *base, "--shard-size", "1")[0] == 0
    assert len(list(out.glob("shard-*.tar"))) == 6
    status, _, err = run(capsys, *base, "--shard-size", "4")
    assert status == 1 and "already holds 6 shard(s)" in err and "--overwrite" in err
    status, _, _ = run(capsys, *base, "--shard-size", "4", "--overwrite")
    assert status == 0 and sorted(p.name for p in out.glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar"]


def test_inspect_counts_captions_over_the_context_before_truncation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "img").mkdir()
    rows = ["filepath,caption"]
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(image_bytes(i))
        words = 200 if i < 3 else 3  # 3 of 4 captions are far longer than the 24-token context
        rows.append(f"img/{i}.jpg,{' '.join(['word'] * words)}")
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    counts = tmp_path / "counts.json"
    status, out, err = run(
        capsys, "data", "inspect", str(tmp_path / "rows.csv"), "--preset", "clip-tiny-test", "--out", "",
        "--json", str(counts),
    )  # fmt: skip
    assert status == 0, err
    assert "75.0% exceed the 24-token context" in out
    record = json.loads(counts.read_text())
    assert record["exceed_context_percent"] == 75.0 and record["context_length"] == 24
    assert record["spec"] == str(tmp_path / "rows.csv") and record["limit"] == 1000


def test_bench_data_worker_lists_progress_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_counts("10") == [10] and worker_counts("0, 2,4") == [0, 2, 4]
    status, _, err = run(capsys, "bench", "data", "--preset", "clip-tiny-test", "--workers", "2;4")
    assert status == 2 and "--workers takes comma-separated counts" in err and err.count("\n") == 1
    status, _, err = run(capsys, "bench", "data", "--preset", "clip-tiny-test", "--batch-size", "0")
    assert status == 2 and "--batch-size must be positive" in err
    figures = tmp_path / "bench.json"
    status, out, err = run(
        capsys, "bench", "data", "--preset", "clip-tiny-test", "--workers", "0", "--batches", "2",
        "--batch-size", "8", "--json", str(figures), "data.builtin.num_train=64",
    )  # fmt: skip
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("bench data: clip-tiny-test on builtin:shapes, batch 8, workers 0: 2 batches each")
    assert lines[2].split()[:2] == ["clip-tiny-test", "0"]
    rows = json.loads(figures.read_text())["loader"]
    assert [(r["workers"], r["batches"], r["images"]) for r in rows] == [(0, 2, 16)]
    usage = build_parser("bench").parse_args(["bench", "data", "--preset", "x"])
    assert usage.workers == "0,1,2"
    with pytest.raises(SystemExit):
        main(["bench", "data", "--help"])
    assert capsys.readouterr().out.startswith("usage: harmony bench data [-h] --preset PRESET")


def test_every_data_flag_has_help() -> None:
    parser = build_parser("data")
    data = next(a for a in parser._subparsers._group_actions[0].choices["data"]._actions if a.dest == "data_command")  # type: ignore[union-attr]
    for name, sub in data.choices.items():
        for action in sub._actions:
            assert action.help, f"harmony data {name} {action.option_strings or action.dest} has no help"


def test_inspect_takes_the_csv_keys_as_from_csv_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.jpg").write_bytes(image_bytes(0))
    (tmp_path / "oc.tsv").write_text("filepath\ttitle\nimg/0.jpg\ta red square\n")
    base = ["data", "inspect", str(tmp_path / "oc.tsv"), "--preset", "clip-tiny-test", "--out", ""]
    status, _, err = run(capsys, *base)
    assert status == 1 and "data.csv_caption_key=COL (train) or --caption-key COL" in err
    counts = tmp_path / "counts.json"
    status, out, err = run(capsys, *base, "--caption-key", "title", "--json", str(counts))
    assert status == 0 and "scanned 1 samples: 1 usable" in out, err
    assert json.loads(counts.read_text())["overrides"] == ["data.csv_caption_key=title"]
    status, _, err = run(capsys, "data", "inspect", str(tmp_path / "img"), "--out", "")
    assert status == 1 and "it holds images; make shards with harmony data from-folder" in err
