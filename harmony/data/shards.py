"""Writing WebDataset shards (img2dataset layout) and the `harmony data synth` tool."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from harmony.data.shapes import ShapesDataset, ShapesSample


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class ShardWriter:
    """Writes samples to `{prefix}-{index:05d}.tar`, starting a new shard every `per_shard` samples.

    Shards are written under a temporary name and renamed when complete, so a reader never sees a
    half-written shard.
    """

    folder: Path
    per_shard: int = 1000
    prefix: str = "shard"

    def __post_init__(self) -> None:
        import tarfile

        self._tarfile = tarfile
        self.folder.mkdir(parents=True, exist_ok=True)
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._in_shard = 0
        self.shards: list[Path] = []
        self.samples = 0

    def _open(self) -> None:
        self._path = self.folder / f"{self.prefix}-{len(self.shards):05d}.tar"
        self._tar = self._tarfile.open(self._path.with_suffix(".tar.tmp"), "w")
        self._in_shard = 0

    def _close(self) -> None:
        if self._tar is not None and self._path is not None:
            self._tar.close()
            self._path.with_suffix(".tar.tmp").replace(self._path)
            self.shards.append(self._path)
            self._tar = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self._tar is None or self._in_shard >= self.per_shard:
            self._close()
            self._open()
        assert self._tar is not None
        for ext, data in files.items():
            info = self._tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.samples += 1

    def close(self) -> list[Path]:
        self._close()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        """Completes the last shard; after an error or Ctrl-C it is dropped instead, so that no shard that
        looks whole holds only part of what was meant to go in it."""
        if kind is None:
            self.close()
        elif self._tar is not None and self._path is not None:
            self._tar.close()
            self._path.with_suffix(".tar.tmp").unlink(missing_ok=True)
            self._tar = None


def shapes_files(sample: ShapesSample) -> dict[str, bytes]:
    """A built-in sample as shard members: image, caption, metadata, semantic and instance masks."""
    return {
        "png": png_bytes(sample.image),
        "txt": sample.caption.encode(),
        "json": json.dumps(sample.metadata()).encode(),
        "seg.png": png_bytes(sample.semantic),
        "inst.png": png_bytes(sample.instances),
    }


def write_shapes(dataset: ShapesDataset, folder: Path, per_shard: int = 1000, progress: bool = True) -> list[Path]:
    indices: Iterable[int] = range(len(dataset))
    if progress:
        indices = tqdm(indices, desc=f"writing {dataset.split} shards", unit="img")
    with ShardWriter(folder, per_shard, prefix=dataset.split) as writer:
        for i in indices:
            sample = dataset[i]
            writer.write(sample.key, shapes_files(sample))
    return writer.shards
