"""Labelled image sets for evaluation: `builtin:shapes[:split[:shape|color]]` or an image folder (one
sub-folder per class). The built-in set is labelled by its primary object's shape, or by its colour
(`builtin:shapes:val:color`), which tells whether a model learnt shape or only colour."""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from harmony.config import Config
from harmony.core.colors import WHITE
from harmony.data.decode import DEFAULT_MAX_PIXELS, IMAGE_FILE_SUFFIXES
from harmony.data.shapes import CLASS_NAMES, COLOR_NAMES, ShapesDataset
from harmony.data.sources import DataError, SampleError
from harmony.eval.images import Colour, SkippingLoader, Skips, background_name, either, read_image, require_some
from harmony.eval.transforms import eval_transform
from harmony.models.normalize import normalize


@dataclass
class LabelledImages:
    """`identity` changes whenever the files do (the feature cache is keyed on it)."""

    name: str
    class_names: list[str]
    size: int
    get: Callable[[int], tuple[Image.Image, int]]
    identity: str = ""

    def __len__(self) -> int:
        return self.size


BUILTIN_LABELS = {"shape": CLASS_NAMES, "color": COLOR_NAMES}


def builtin_parts(spec: str) -> tuple[str, str]:
    """(split, label kind) of `builtin:shapes[:train|val[:shape|color]]`."""
    parts = spec.split(":")
    ok = (
        parts[:2] == ["builtin", "shapes"]
        and len(parts) <= 4
        and (len(parts) < 3 or parts[2] in ("train", "val"))
        and (len(parts) < 4 or parts[3] in BUILTIN_LABELS)
    )
    if not ok:
        raise DataError(
            f"unknown built-in dataset '{spec}': use builtin:shapes[:train|val], optionally labelled by "
            "':shape' (default) or ':color'"
        )
    return (parts[2] if len(parts) >= 3 else "train"), (parts[3] if len(parts) == 4 else "shape")


def shapes_dataset(spec: str, cfg: Config) -> ShapesDataset:
    b = cfg.data.builtin
    split = builtin_parts(spec)[0]
    return ShapesDataset(split, b.num_train if split == "train" else b.num_val, b.image_size, b.seed, b.mismatch_rate)


def is_hidden(path: Path, root: Path) -> bool:
    """A dot-file or anything under a dot-folder below `root` (.DS_Store, ._x.jpg, .ipynb_checkpoints/)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def image_files(folder: Path) -> list[Path]:
    """Image files anywhere under `folder` (by suffix, as training reads them), hidden ones left out, sorted."""
    return sorted(p for p in visible_files(folder) if p.suffix.lower() in IMAGE_FILE_SUFFIXES)


def visible_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not is_hidden(p, folder)]


def warn_ignored(root: Path, folders: list[Path]) -> None:
    """One stderr line naming the files below `folders` that are left out because they are not images."""
    others = Counter(p.suffix.lower() or "(none)" for f in folders for p in visible_files(f))
    for suffix in IMAGE_FILE_SUFFIXES:
        others.pop(suffix, None)
    if others:
        kinds = ", ".join(f"{suffix}: {n}" for suffix, n in sorted(others.items()))
        print(
            f"harmony eval: warning: {sum(others.values())} file(s) of '{root}' are not images by their suffix and "
            f"are left out ({kinds})",
            file=sys.stderr,
        )


def image_folder(root: Path, background: Colour = WHITE, max_pixels: int = DEFAULT_MAX_PIXELS) -> LabelledImages:
    """One class per visible sub-folder (sorted by name); unreadable images raise SampleError on `get`."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder '{root}' has no class sub-folders")
    files = [(path, label) for label, name in enumerate(classes) for path in image_files(root / name)]
    warn_ignored(root, [root / name for name in classes])
    if not files:
        raise DataError(f"image folder '{root}' holds no images")
    empty = sorted(set(classes) - {classes[label] for _, label in files})
    if empty:
        print(
            f"harmony eval: warning: class folder(s) {', '.join(empty)} of '{root}' hold no images; "
            "they still count as classes",
            file=sys.stderr,
        )

    def get(i: int) -> tuple[Image.Image, int]:
        path, label = files[i]
        return read_image(path, background, max_pixels), label

    name = str(root) if background == WHITE else f"{root} on {background_name(background)}"
    return LabelledImages(name, classes, len(files), get, fingerprint(root, files))


def fingerprint(root: Path, files: list[tuple[Path, int]]) -> str:
    """A digest of every file's class, relative path, size and modification time: an image edited,
    replaced or moved to another class gives another digest (one stat per file, no reading)."""
    digest = hashlib.sha1()
    for path, label in files:
        stat = path.stat()
        digest.update(f"{label}\0{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def check_same_classes(train: LabelledImages, test: LabelledImages, train_spec: str, spec: str) -> None:
    """DataError naming the differing class folders when the two splits' classes differ (the labels,
    indices into the class list, would mean different things)."""
    if train.class_names == test.class_names:
        return
    only_train = sorted(set(train.class_names) - set(test.class_names))
    only_test = sorted(set(test.class_names) - set(train.class_names))
    raise DataError(
        f"'{train_spec}' and '{spec}' have different classes: only in training {only_train or 'none'}, "
        f"only in evaluation {only_test or 'none'} (an empty folder counts as a class)"
    )


def default_train_spec(spec: str) -> str:
    """The training split that goes with an evaluation spec: `builtin:shapes` for the built-in val
    split, a sibling `train/` (or `training/`) folder for a `val/`, `validation/` or `test/` folder,
    and for a file the same name with `val` replaced by `train` (`instances_val2017.json`)."""
    if spec.startswith("builtin:"):
        labels = builtin_parts(spec)[1]
        return "builtin:shapes" if labels == "shape" else f"builtin:shapes:train:{labels}"
    path = Path(spec)
    candidates = [path.parent / name for name in ("train", "training")] if path.is_dir() else []
    if path.is_file() and "val" in path.name:
        candidates.append(path.with_name(path.name.replace("val", "train")))
    if path.name in ("val", "validation", "test") or path.is_file():
        for candidate in candidates:
            if candidate.exists():
                return str(candidate)
    raise DataError(f"no training split found next to '{spec}': pass one with --train")


def pick(total: int, limit: int, seed: int = 0) -> list[int]:
    """A fixed random subset of `limit` indices out of `total` (all when limit is 0 or enough)."""
    if limit <= 0 or limit >= total:
        return list(range(total))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=generator)[:limit].tolist())


def subset(data: LabelledImages, limit: int, seed: int = 0) -> LabelledImages:
    """The same set restricted to a fixed random subset of at most `limit` images."""
    index = pick(len(data), limit, seed)
    if len(index) == len(data):
        return data
    return LabelledImages(
        f"{data.name}[{len(index)} seed {seed}]",
        data.class_names,
        len(index),
        lambda i: data.get(index[i]),
        data.identity,
    )


def open_labelled(spec: str, cfg: Config, background: Colour = WHITE) -> LabelledImages:
    """A labelled image set from a spec: `builtin:shapes[:val[:color]]` or a class-folder tree (whose
    transparent images are composited over `background`)."""
    if spec.startswith("builtin:"):
        ds = shapes_dataset(spec, cfg)
        labels = builtin_parts(spec)[1]

        def get(i: int) -> tuple[Image.Image, int]:
            sample = ds[i]
            return sample.image, sample.color if labels == "color" else sample.label

        return LabelledImages(spec, list(BUILTIN_LABELS[labels]), len(ds), get)
    root = Path(spec)
    if root.is_dir():
        return image_folder(root, background, cfg.data.max_image_pixels)
    raise DataError(
        f"'{spec}' is not a labelled dataset (builtin:shapes[:val] or a folder with one sub-folder per class)"
    )


@dataclass
class LabelledSplits:
    """The training and evaluation splits of a classification protocol; `train_spec` is the spec the training
    split was opened from (given, or found next to the evaluation split)."""

    train_spec: str
    train: LabelledImages
    test: LabelledImages

    @property
    def num_classes(self) -> int:
        return len(self.train.class_names)


def labelled_splits(
    cfg: Config,
    data_spec: str,
    train_spec: str | None,
    background: Colour,
    max_train: int,
    max_eval: int,
    seed: int = 0,
) -> LabelledSplits:
    """Both splits of a classification protocol (k-NN, linear probe, fine-tuning): the training spec defaults to
    the split next to `data_spec`, each split is a fixed random subset (`max_train`, `max_eval`; 0 = all) drawn
    with `seed`, and the two must have the same classes."""
    train_spec = train_spec or default_train_spec(data_spec)
    train = subset(open_labelled(train_spec, cfg, background), max_train, seed)
    test = subset(open_labelled(data_spec, cfg, background), max_eval, seed)
    check_same_classes(train, test, train_spec, data_spec)
    return LabelledSplits(train_spec, train, test)


class EvalViews(Dataset[tuple[torch.Tensor, int] | SampleError]):
    """Deterministic uint8 eval views of a labelled set, optionally through a training `transform`;
    an unreadable image is handed out as its SampleError (see `SkippingLoader`)."""

    def __init__(
        self,
        data: LabelledImages,
        image_size: int,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.data, self.image_size, self.transform = data, image_size, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | SampleError:
        item = either(self.data.get, i)
        if isinstance(item, SampleError):
            return item
        image, label = item
        if self.transform is not None:
            return self.transform(image), label
        return eval_transform(image, self.image_size), label


def eval_batches(
    data: LabelledImages,
    image_size: int,
    batch_size: int,
    num_workers: int,
    skips: Skips,
    index: Sequence[int] | None = None,
) -> SkippingLoader[list[torch.Tensor]]:
    """Batches (uint8 eval views [B, 3, S, S], labels [B]) of a labelled set, or of its images `index` in that
    order; unreadable images are counted in `skips` and left out."""
    views: Dataset[Any] = EvalViews(data, image_size)
    if index is not None:
        views = Subset(views, list(index))
    return SkippingLoader(views, skips, batch_size=batch_size, num_workers=num_workers)


@torch.no_grad()
def encode_batches(
    encode: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[Sequence[torch.Tensor]],
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(float32 CPU features of each batch from `encode(normalised images)`, the batches' labels)."""
    feats, labels = [], []
    for images, target in batches:
        feats.append(encode(normalize(images.to(device))).float().cpu())
        labels.append(target)
    return feats, labels


@torch.no_grad()
def extract(
    encode: Callable[[torch.Tensor], torch.Tensor],
    data: LabelledImages,
    image_size: int,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 2,
    skips: Skips | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, ...] from `encode(normalised images)`, labels [N]) over the readable images of a
    labelled set; the unreadable ones are counted in `skips` (DataError when none is readable)."""
    skips = Skips() if skips is None else skips
    feats, labels = encode_batches(encode, eval_batches(data, image_size, batch_size, num_workers, skips), device)
    require_some(len(labels), skips, data.name)
    return torch.cat(feats), torch.cat(labels)
