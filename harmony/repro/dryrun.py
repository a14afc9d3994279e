"""`harmony repro --dry-run`: every path and format a suite reads, checked before anything trains.

Each check reads as little as names the problem: the training shards are each opened at their first sample
(a few decoded whole) and counted; class folders are listed and compared between the splits, one image per
sampled class read; ADE20K-style folders are paired as `harmony eval segment` pairs them, a few pairs read;
COCO json files are parsed (a very large one is scanned for its top-level keys instead) and a few of the images
they name are read from where `harmony eval` looks for them. Every problem is one line naming the thing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmony.core.errors import HarmonyError
from harmony.data.decode import DEFAULT_MAX_PIXELS, IMAGE_FILE_SUFFIXES, open_image
from harmony.data.errors import SampleError
from harmony.data.shard_reader import count_samples, header_problem, image_extension, is_remote, read_shard
from harmony.data.sources import expand_urls
from harmony.repro.suite import Suite, Task

SAMPLED_SHARDS = 3  # shards whose first samples are decoded whole (first, middle, last)
SAMPLED_IMAGES = 3  # images read per split, class folder set or json
PARSED_JSON_BYTES = 64 * 2**20  # larger json files are scanned for their keys, not parsed
LABELLED = ("zeroshot", "knn", "linear", "finetune")


@dataclass
class Findings:
    """What the checks found: one line per thing checked, one line per problem, the training samples."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    train_samples: int = 0

    def problem(self, text: str) -> None:
        """Record a problem once (two tasks reading one folder find it twice)."""
        if text not in self.problems:
            self.problems.append(text)


def check_suite_data(suite: Suite) -> Findings:
    """Every data path of `suite`: the training data and each evaluation task's sets (tasks that read the same
    sets the same way are checked once, named together)."""
    found = Findings()
    check_training_data(suite.train.data, found)
    groups: dict[tuple[str, str, str], list[Task]] = {}
    for name in suite.eval.tasks:
        task = suite.eval.task(name)
        if not task.data.startswith("builtin:"):
            kind = "labelled" if task.protocol in LABELLED and task.protocol != "zeroshot" else task.protocol
            groups.setdefault((kind, task.data, task.train), []).append(task)
    for tasks in groups.values():
        before = len(found.problems)
        try:
            summary = _check_task(tasks[0], found)
        except HarmonyError as exc:
            found.problem(f"{tasks[0].name}: {exc}")
            summary = ""
        status = "ok" if len(found.problems) == before else f"{len(found.problems) - before} problem(s)"
        names = ", ".join(t.name for t in tasks)
        found.lines.append(f"{names} '{tasks[0].data}': {summary}{'; ' if summary else ''}{status}")
    return found


def _check_task(task: Task, found: Findings) -> str:
    from harmony.eval.datasets import default_train_spec

    trains = task.protocol != "zeroshot" and task.protocol != "retrieval"
    train = (task.train or default_train_spec(task.data)) if trains else ""
    if task.protocol in LABELLED:
        return check_class_folders(task, train, found)
    if task.protocol == "segment":
        return ", ".join(check_segmentation_split(spec, found) for spec in (train, task.data))
    if task.protocol == "detect":
        return ", ".join(check_coco_json(spec, "instances", found) for spec in (train, task.data))
    if task.protocol == "retrieval":
        if task.data.lower().endswith(".json"):
            return check_coco_json(task.data, "captions", found)
        if task.data.lower().endswith((".csv", ".tsv")):
            return "table exists" if Path(task.data).is_file() else _missing(found, task.data, "file")
        return check_shards(task.data, found, count=False)
    return "not checked"


def _missing(found: Findings, path: str | Path, what: str) -> str:
    found.problem(f"'{path}' does not exist (expected a {what})")
    return "missing"


def check_training_data(spec: str, found: Findings) -> None:
    if spec.startswith("builtin:"):
        found.lines.append(f"training data '{spec}': built in")
        return
    if spec.lower().endswith((".csv", ".tsv")) or "::" in spec:
        exists = all(is_remote(p) or Path(p).exists() or any(c in p for c in "{*?[") for p in spec.split("::"))
        found.lines.append(f"training data '{spec}': {'found' if exists else 'missing'} (read when training starts)")
        if not exists:
            found.problem(f"training data '{spec}' does not exist")
        return
    before = len(found.problems)
    summary = check_shards(spec, found, count=True)
    status = "ok" if len(found.problems) == before else f"{len(found.problems) - before} problem(s)"
    found.lines.append(f"training data '{spec}': {summary}; {status}")


def check_shards(spec: str, found: Findings, count: bool) -> str:
    """Every local shard opened at its first sample, a few decoded whole, each counted when `count`."""
    try:
        urls = expand_urls(spec)
    except HarmonyError as exc:
        found.problem(str(exc))
        return "no shards"
    local = [u for u in urls if not is_remote(u)]
    sampled = {local[i] for i in {0, len(local) // 2, len(local) - 1}} if local else set()
    for url in local:
        _check_shard(url, SAMPLED_IMAGES if url in sampled else 1, url in sampled, found)
    if count and local:
        found.train_samples = sum(count_samples(u) for u in local)
    counted = f", {found.train_samples:,} samples" if count and local else ""
    remote = f", {len(urls) - len(local)} remote (not opened)" if len(local) < len(urls) else ""
    return f"{len(local)} shard(s){counted}{remote}, {len(sampled)} decoded"


def _check_shard(url: str, samples: int, decode: bool, found: Findings) -> None:
    """The shard opens and its first `samples` usable samples read (images decoded when `decode`); a shard
    whose first samples are all unusable is named with the first reason."""
    read, first = 0, ""
    for looked, item in enumerate(read_shard(url)):
        if isinstance(item, SampleError) and item.reason == "shard":
            found.problem(str(item))
            return
        problem = item if isinstance(item, SampleError) else header_problem(item) or _undecodable(item, decode)
        if problem is not None:
            first = first or str(problem)
        else:
            read += 1
        if read >= samples or looked >= 10 * samples:
            break
    if read == 0:
        found.problem(f"shard '{url}': {first}" if first else f"shard '{url}' holds no sample")


def _undecodable(sample: dict[str, object], decode: bool) -> str | None:
    if not decode:
        return None
    data = sample[str(image_extension(sample))]
    try:
        assert isinstance(data, bytes)
        open_image(data, DEFAULT_MAX_PIXELS).load()
    except Exception as exc:  # whatever the codec raises for corrupt data
        return f"sample {sample['__key__']} has an unreadable image ({exc})"
    return None


def class_folders(root: Path) -> list[str]:
    """The class sub-folders of an image-folder split, as `harmony eval` lists them."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _first_image(folder: Path) -> Path | None:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_FILE_SUFFIXES:
                return Path(dirpath) / name
    return None


def check_class_folders(task: Task, train: str, found: Findings) -> str:
    """The evaluation split (and the training split when the protocol trains): class folders present, the
    same in both, each holding an image, a few images readable; a named class-name set of the right size."""
    from harmony.eval.images import read_image

    splits = [Path(s) for s in (train, task.data) if s]
    if any(not p.is_dir() for p in splits):
        for p in splits:
            if not p.is_dir():
                _missing(found, p, "folder with one sub-folder per class")
        return "missing"
    classes = {p: class_folders(p) for p in splits}
    for p, names in classes.items():
        if not names:
            found.problem(f"'{p}' has no class sub-folders")
    if len(splits) == 2 and classes[splits[0]] and classes[splits[1]]:
        for here, there in (splits, splits[::-1]):
            for name in sorted(set(classes[here]) - set(classes[there])):
                found.problem(f"class folder '{name}' is in '{here}' but missing from '{there}'")
    for p, names in classes.items():
        picks = {names[i] for i in {0, len(names) // 2, len(names) - 1}} if names else set()
        for name in names:
            image = _first_image(p / name)
            if image is None:
                found.problem(f"class folder '{p / name}' holds no image")
            elif name in picks:
                try:
                    read_image(image)
                except SampleError as exc:
                    found.problem(str(exc))
    named = task.settings.get("classnames")
    count = len(classes[splits[-1]])
    if task.protocol == "zeroshot" and named:
        from harmony.eval.zeroshot import class_name_set

        if len(class_name_set(str(named))) != count:
            found.problem(
                f"'{task.data}' has {count} class folders but class names '{named}' name "
                f"{len(class_name_set(str(named)))} classes"
            )
    if len(splits) == 1:
        return f"{count} classes"
    trained = len(classes[splits[0]])
    return f"{count} classes in both splits" if trained == count else f"{trained} training, {count} evaluation classes"


def check_segmentation_split(spec: str, found: Findings) -> str:
    """An ADE20K-style split as `harmony eval segment` reads it: `<root>/images/<split>` with the masks of the
    same stems in `<root>/annotations/<split>`; a few pairs read."""
    from harmony.eval.images import read_image
    from harmony.eval.segdata import read_mask

    images = Path(spec)
    parts = list(images.parts)
    at = max((i for i, part in enumerate(parts) if part == "images"), default=None)
    if at is None:
        found.problem(f"'{spec}' is not an images/<split> folder (ADE20K layout: images/ and annotations/)")
        return "not ADE20K"
    masks = Path(*parts[:at], "annotations", *parts[at + 1 :])
    for folder in (images, masks):
        if not folder.is_dir():
            return _missing(found, folder, "folder of the ADE20K layout (images/<split>, annotations/<split>)")
    stems = {p.stem for p in masks.iterdir() if p.suffix.lower() == ".png"}
    pairs = [p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_FILE_SUFFIXES and p.stem in stems]
    if not pairs:
        found.problem(f"'{images}' has no image with a mask in '{masks}'")
        return "no pairs"
    for image in pairs[:SAMPLED_IMAGES]:
        try:
            read_image(image)
            if read_mask(masks / f"{image.stem}.png", DEFAULT_MAX_PIXELS).ndim != 2:
                found.problem(f"mask '{masks / image.stem}.png' is not one class per pixel")
        except SampleError as exc:
            found.problem(str(exc))
    return f"{images.name}: {len(pairs):,} pairs"


def check_coco_json(spec: str, kind: str, found: Findings) -> str:
    """A COCO json (`captions`: images + annotations, or Karpathy's images + sentences; `instances`: images,
    annotations, categories) and a few of its images, looked up where `harmony eval` looks for them."""
    path = Path(spec)
    if not path.is_file():
        return _missing(found, path, f"COCO {kind} json")
    needed = ("images", "annotations") + (("categories",) if kind == "instances" else ())
    try:
        keys, names = _json_keys(path)
    except (OSError, ValueError) as exc:
        found.problem(f"'{path}' is not readable json ({str(exc).splitlines()[0]})")
        return "unreadable"
    if kind == "captions" and names is None:
        return "Karpathy-split json"
    lacking = [k for k in needed if k not in keys]
    if lacking:
        found.problem(f"'{path}' has no '{lacking[0]}' (COCO {kind} json holds {', '.join(needed)})")
        return "incomplete"
    guess = path.parent.parent / path.stem.split("_")[-1]
    root = guess if guess.is_dir() else path.parent
    from harmony.eval.images import read_image

    for name in (names or [])[:SAMPLED_IMAGES]:
        try:
            read_image(root / name)
        except SampleError as exc:
            found.problem(f"{exc} (named by '{path}')")
    return f"{path.name}: images in '{root}'"


def _json_keys(path: Path) -> tuple[set[str], list[str] | None]:
    """(top-level keys, the first image file names) of a json file: parsed when small, scanned when large.
    Karpathy-split files (images with `sentences`) give None for the names."""
    if path.stat().st_size <= PARSED_JSON_BYTES:
        data: Any = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("the top level is not an object")
        images = data.get("images") or []
        if images and isinstance(images[0], dict) and "sentences" in images[0]:
            return set(data), None
        return set(data), [str(im.get("file_name", "")) for im in images[:SAMPLED_IMAGES] if isinstance(im, dict)]
    keys: set[str] = set()
    names: list[str] = []
    with path.open("rb") as f:
        if f.read(1).lstrip() not in (b"{", b""):
            raise ValueError("it does not start with '{'")
        tail = b""
        while chunk := f.read(16 * 2**20):
            text = tail + chunk
            keys |= {k.decode() for k in re.findall(rb'"(images|annotations|categories)"\s*:', text)}
            listed = [n.decode() for n in re.findall(rb'"file_name"\s*:\s*"([^"]+)"', text)]
            names += listed[: max(0, SAMPLED_IMAGES - len(names))]
            tail = text[-64:]
    return keys, names
