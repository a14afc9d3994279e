"""The paper's suites at full scale, checked against a miniature of the real data layouts: CC3M-style shards, an
ImageNet-style class-folder tree, an ADE20K-style folder and COCO json files. `--dry-run` passes on it and names
each broken thing in one line; the suite trains and evaluates on it end to end with a shrunken budget."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from PIL import Image

from harmony.config import ConfigError
from harmony.data.shapes import ShapesDataset
from harmony.data.shards import write_shapes
from harmony.eval.detdata import coco_ground_truth, open_detection
from harmony.presets import build_config
from harmony.repro.suite import adjusted, load_suite
from harmony.typed import flatten, to_dict
from tests.conftest import REPO, Cli, tiny


def build_miniature(root: Path, classes: int = 1000) -> dict[str, str]:
    """The real layouts at 32 px, a few images each; returns the suite variables that point at them. ImageNet has
    its 1000 class folders (one image each), or `classes` of them with a few images each for a quicker run."""
    shapes = ShapesDataset("train", 24, 32)
    write_shapes(ShapesDataset("train", 16, 32), root / "cc3m", per_shard=8, progress=False)
    jpegs = []
    for i in range(8):
        buffer = io.BytesIO()
        shapes[i].image.save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    per_class = 1 if classes > 100 else 4
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / "imagenet" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{split}_{c}_{i}.JPEG").write_bytes(jpegs[(c + i + (split == "val")) % 8])
    for split in ("training", "validation"):
        (root / "ade" / "images" / split).mkdir(parents=True)
        (root / "ade" / "annotations" / split).mkdir(parents=True)
        for i in range(4):
            s = shapes[i + (0 if split == "training" else 8)]
            s.image.save(root / "ade" / "images" / split / f"ADE_{split}_{i}.jpg")
            Image.fromarray(s.semantic + 1).save(root / "ade" / "annotations" / split / f"ADE_{split}_{i}.png")
    annotations = root / "coco" / "annotations"
    annotations.mkdir(parents=True)
    cfg = tiny("clip-tiny-test", "data.builtin.image_size=32")
    builtin = open_detection("builtin:shapes:val", cfg)
    for split, first in (("train2017", 0), ("val2017", 4)):
        (root / "coco" / split).mkdir()
        targets = []
        for i in range(4):
            image, target = builtin.get(first + i)
            image.save(root / "coco" / split / f"{i:012d}.jpg")
            targets.append(target)
        truth = coco_ground_truth(targets, [(32, 32)] * 4, builtin.class_names)
        for im in truth["images"]:
            im["file_name"] = f"{im['id']:012d}.jpg"
        (annotations / f"instances_{split}.json").write_text(json.dumps(truth))
    captions = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(4)],
        "annotations": [{"id": i, "image_id": i, "caption": shapes[i + 4].caption} for i in range(4)],
    }
    (annotations / "captions_val2017.json").write_text(json.dumps(captions))
    return {
        "train_data": str(root / "cc3m" / "train-{00000..00001}.tar"),
        "imagenet": str(root / "imagenet"),
        "ade20k": str(root / "ade"),
        "coco": str(root / "coco"),
    }


def assignments(values: dict[str, str]) -> list[str]:
    return ["--set", *(f"{k}={v}" for k, v in values.items())]


def readme_commands() -> list[list[str]]:
    """The `harmony repro --suite paper-table1` commands of the README's "Reproducing the paper at full scale"."""
    text = (REPO / "README.md").read_text().split("## Reproducing the paper at full scale", 1)[1].split("\n## ", 1)[0]
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith("harmony repro --suite paper-table1")]


def on_miniature(command: list[str], values: dict[str, str], out: Path | None = None) -> list[str]:
    """A README command with its data paths (and output folder) replaced by the miniature's."""
    replaced = [
        f"{word.split('=')[0]}={values[word.split('=')[0]]}" if word.split("=")[0] in values else word
        for word in command
    ]
    if out is not None:
        replaced[replaced.index("--out") + 1] = str(out)
    return replaced


@pytest.fixture(scope="module")
def miniature(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("miniature")
    return root, build_miniature(root)


def broken_copy(tmp_path: Path, miniature: tuple[Path, dict[str, str]]) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "broken"
    shutil.copytree(miniature[0], root)
    return root, {k: v.replace(str(miniature[0]), str(root)) for k, v in miniature[1].items()}


def test_dry_run_of_the_miniature_passes_and_estimates_the_compute(
    miniature: tuple[Path, dict[str, str]], cli: Cli
) -> None:
    command = on_miniature(next(c for c in readme_commands() if "--dry-run" in c), miniature[1])
    proc = cli(*command, "--size", "tiny-test", "--methods", "clip,harmony", "--gpu", "a100", "--mfu", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "problem" not in proc.stdout and proc.stderr == ""
    assert "training data" in proc.stdout and "2 shard(s), 16 samples, 2 decoded; ok" in proc.stdout
    for task in ("zeroshot", "finetune", "linear", "segment", "detect", "retrieval"):
        assert re.search(rf"^\[dry-run\] .*\b{task}\b.*; ok$", proc.stdout, re.M), task
    assert "compute estimate: A100 at 312 TFLOP/s dense bf16, 50 % MFU" in proc.stdout
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if "-tiny-test " in line}
    assert set(rows) == {"clip-tiny-test", "harmony-tiny-test"}
    assert rows["clip-tiny-test"][2] == "1.00" and float(rows["harmony-tiny-test"][2]) > 2
    assert rows["harmony-tiny-test"][3:6] == ["768", "16", "0"], "batch 768 of 16 samples: no step"
    shrunk = cli(*command, "--size", "tiny-test", "--methods", "clip", "--train-set", "train.batch_size=8")
    clip = next(line.split() for line in shrunk.stdout.splitlines() if line.startswith("clip-tiny-test "))
    assert clip[3:6] == ["8", "16", "50"], "25 epochs of 2 steps"
    assert float(clip[1]) * 50 == pytest.approx(float(clip[6]) * 1e6, rel=0.05), "total = steps x per step"


def test_dry_run_names_each_broken_thing_in_one_line(
    tmp_path: Path, miniature: tuple[Path, dict[str, str]], cli: Cli
) -> None:
    root, values = broken_copy(tmp_path, miniature)
    shutil.rmtree(root / "imagenet" / "val" / "n00000500")
    captions = root / "coco" / "annotations" / "captions_val2017.json"
    captions.write_text(json.dumps({"images": json.loads(captions.read_text())["images"]}))
    (root / "cc3m" / "train-00001.tar").write_bytes(b"not a tar archive" * 100)
    proc = cli("repro", "--suite", "paper-table1", "--dry-run", *assignments(values), "--size", "tiny-test")
    assert proc.returncode == 1
    problems = proc.stderr.strip().splitlines()
    assert all(line.startswith("harmony repro --dry-run: ") for line in problems), problems
    assert any(f"shard '{root}/cc3m/train-00001.tar' is unreadable" in line for line in problems), problems
    assert any(
        f"class folder 'n00000500' is in '{root}/imagenet/train' but missing from '{root}/imagenet/val'" in line
        for line in problems
    ), problems
    assert any(f"'{captions}' has no 'annotations'" in line for line in problems), problems
    assert any("has 999 class folders but class names 'imagenet' name 1000 classes" in line for line in problems)
    assert len(problems) == 4, problems
    assert "compute estimate" not in proc.stdout, "nothing is estimated or trained over broken data"


@pytest.mark.parametrize(
    ("breakage", "named"),
    [
        ("ade/annotations/validation", "ade/annotations/validation' does not exist"),
        ("coco/val2017/000000000001.jpg", "000000000001.jpg"),
        ("imagenet/train/n00000007/train_7_0.JPEG", "n00000007' holds no image"),
    ],
)
def test_dry_run_names_a_missing_folder_or_image(
    tmp_path: Path, miniature: tuple[Path, dict[str, str]], cli: Cli, breakage: str, named: str
) -> None:
    root, values = broken_copy(tmp_path, miniature)
    target = root / breakage
    if breakage.endswith(".JPEG"):
        for image in target.parent.iterdir():
            image.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        target.write_bytes(b"\xff\xd8 truncated")
    proc = cli("repro", "--suite", "paper-table1", "--dry-run", *assignments(values), "--size", "tiny-test")
    assert proc.returncode == 1
    assert any(named in line for line in proc.stderr.splitlines()), proc.stderr


def test_the_miniature_trains_and_evaluates_end_to_end(tmp_path: Path, cli: Cli) -> None:
    values = build_miniature(tmp_path / "miniature", classes=3)  # 1000 zero-shot classes would take a minute
    out = tmp_path / "repro"
    command = on_miniature(next(c for c in readme_commands() if "--size" in c), values, out)
    proc = cli(*command, "--eval-set", "zeroshot.classnames=", "zeroshot.templates=simple")  # 3 classes, not 1000
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"clip-tiny-test", "harmony-tiny-test"}
    for run in results.values():
        assert run["train"]["steps"] == 2
        assert set(run["evals"]) == {"zeroshot", "finetune", "linear", "segment", "detect", "retrieval"}
        assert all("metrics" in result for result in run["evals"].values()), run["evals"]
    report = (out / "report.md").read_text()
    assert "## Beside the paper (Table 1, ViT-S rows; COCO retrieval from Table 3)" in report
    zero_shot = re.search(r"\| harmony-tiny-test \| zero-shot top-1 \| (\d+\.\d) \| 21\.0 \| ([+-]\d+\.\d) \|", report)
    assert zero_shot is not None, report
    assert float(zero_shot.group(2)) == pytest.approx(float(zero_shot.group(1)) - 21.0, abs=0.051)
    assert "| clip-tiny-test | COCO R@1 text-to-image |" in report


def test_the_suites_restate_the_presets_and_hold_the_papers_recipe() -> None:
    values = {"train_data": "cc3m/{00000..00331}.tar", "imagenet": "in", "ade20k": "ade", "coco": "coco"}
    table1 = load_suite("paper-table1", values)
    table4 = load_suite("paper-table4", {k: v for k, v in values.items() if k != "coco"})
    assert table1.methods == ["mae", "ibot", "clip", "slip", "maskclip", "harmony"]
    ablations = ["clip+ibot", "clip+ibot+soft", "clip+ibot+soft+mae", "clip+mlm", "clip+mlm+tdist"]
    assert table4.methods == ["clip", *ablations, "harmony"]
    for suite in (table1, table4):
        for preset in suite.presets(False):
            pinned = flatten(to_dict(build_config(preset, suite.overrides_for(preset))))
            assert pinned == flatten(to_dict(build_config(preset, []))), f"{preset}: the suite changes its preset"
            cfg = build_config(preset, suite.overrides_for(preset))
            assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.vision, cfg.model.text) == (
                25,
                768,
                "vit-s16",
                "clip-base",
            )
            assert (cfg.data.augment.global_size, cfg.data.augment.local_size) == (224, 96)
            if cfg.objectives.ibot is not None:
                assert cfg.objectives.ibot.local_crops == 8 and cfg.model.head.out_dim == 8192
            if cfg.objectives.mae is not None:
                assert cfg.objectives.mae.mask_ratio == 0.75
    assert table1.eval.task("linear").train == "in/train" and table1.eval.task("segment").train == "ade/images/training"
    assert table1.paper.results["harmony"]["zero-shot top-1"] == 21.0
    assert table4.paper.results["clip+ibot+soft"]["linear top-1"] == 64.2


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"train_data": "x"}, "suite 'paper-table1' needs --set imagenet=... ade20k=... coco=..."),
        ({"train_data": "x", "imagenet": "i", "ade20k": "a", "coco": "c", "imagnet": "i"}, "no variable 'imagnet'"),
    ],
)
def test_a_missing_or_unknown_variable_is_one_line_naming_it(given: dict[str, str], message: str, cli: Cli) -> None:
    proc = cli("repro", "--suite", "paper-table1", "--dry-run", "--set", *(f"{k}={v}" for k, v in given.items()))
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_suite_variables_and_budget_adjustments(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "methods: [clip, mae]\nvariables: {root: where the data is}\n"
        "train: {data: '${root}/{0..3}.tar', overrides: [train.epochs=3]}\n"
        "eval: {tasks: {knn: {max_train: 5}}}\ncolumns: {k: knn.k20_top1}\n"
    )
    suite = load_suite(str(path), {"root": "/data"})
    assert suite.train.data == "/data/{0..3}.tar" and suite.values == {"root": "/data"}
    small = adjusted(suite, "tiny-test", ["mae"], ["train.max_steps=2"], ["knn.max_train=7", "knn.ks=1,2"])
    assert small.presets(False) == ["mae-tiny-test"]
    assert small.overrides_for("mae-tiny-test") == ["train.epochs=3", "train.max_steps=2"]
    assert small.eval.task("knn").settings == {"max_train": 7, "ks": (1, 2)}
    for bad, message in ((["knn.k=1"], "knn has no setting 'k'"), (["zeroshot.top=1"], "name a task of the suite")):
        with pytest.raises(ConfigError, match=message):
            adjusted(suite, eval_set=bad)
    path.write_text(path.read_text().replace("${root}", "${rot}"))
    with pytest.raises(ConfigError, match=r"train.data uses \$\{rot\}, which 'variables' does not declare"):
        load_suite(str(path), {"root": "/data"})
