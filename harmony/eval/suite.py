"""The protocol registry and `run_suite`: every protocol on one checkpoint, one JSON per task.

Each protocol is a function `run_<task>(pretrained, data_spec, device, ..., **settings) -> result`,
so other code (a benchmark over many checkpoints) calls them directly or through `run_task`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harmony.core.colors import WHITE
from harmony.core.errors import ConfigError
from harmony.eval.attention import ATTENTION_FULL, AttentionSettings, run_attention
from harmony.eval.detect import DETECT_FULL, DetectSettings, run_detect
from harmony.eval.finetune import FINETUNE_FULL, FinetuneSettings, run_finetune
from harmony.eval.images import Colour
from harmony.eval.knn import KNN_FULL, KnnSettings, run_knn
from harmony.eval.linear import LINEAR_FULL, LinearSettings, run_linear
from harmony.eval.report import report_skips, result_table, write_result
from harmony.eval.retrieval import RETRIEVAL_FULL, RetrievalSettings, run_retrieval
from harmony.eval.segment import SEGMENT_FULL, SegmentSettings, run_segment
from harmony.eval.zeroshot import ZEROSHOT_FULL, ZeroShotSettings, run_zeroshot
from harmony.loading import Pretrained
from harmony.models.vision import VisionTower


@dataclass(frozen=True)
class Protocol:
    run: Callable[..., dict[str, Any]]
    defaults: Any
    full: Any
    help: str
    needs_text: bool = False
    trains: bool = False  # takes `train_spec`
    caches: bool = False  # takes `cache_dir`
    loads: bool = True  # takes `num_workers` (a data loader)
    patch_tokens: str = ""  # what it reads of the ViT's patch tokens (a CNN tower, which has none, is refused)


PROTOCOLS: dict[str, Protocol] = {
    "zeroshot": Protocol(
        run_zeroshot, ZeroShotSettings(), ZEROSHOT_FULL, "zero-shot classification with prompt templates", True
    ),
    "retrieval": Protocol(
        run_retrieval, RetrievalSettings(), RETRIEVAL_FULL, "image-text retrieval Recall@k both ways", True
    ),
    "knn": Protocol(run_knn, KnnSettings(), KNN_FULL, "weighted k-NN on frozen CLS features", trains=True, caches=True),
    "linear": Protocol(
        run_linear, LinearSettings(), LINEAR_FULL, "linear probe, lr sweep on cached features", trains=True, caches=True
    ),
    "finetune": Protocol(
        run_finetune, FinetuneSettings(), FINETUNE_FULL, "full fine-tuning with layer-wise lr decay", trains=True
    ),
    "segment": Protocol(
        run_segment,
        SegmentSettings(),
        SEGMENT_FULL,
        "semantic segmentation: frozen linear and ViT+FPN",
        trains=True,
        patch_tokens="a per-patch feature map",
    ),
    "detect": Protocol(
        run_detect,
        DetectSettings(),
        DETECT_FULL,
        "Mask R-CNN detection and instance segmentation",
        trains=True,
        patch_tokens="a feature pyramid built from the ViT's patch tokens",
    ),
    "attention": Protocol(
        run_attention,
        AttentionSettings(),
        ATTENTION_FULL,
        "CLS attention and text-similarity maps (PNGs)",
        loads=False,
        patch_tokens="the last block's CLS attention over the patches and each patch's embedding",
    ),
}


def run_task(
    task: str,
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    train_spec: str | None = None,
    cache_dir: Path | None = None,
    maps_dir: Path | None = None,
    num_workers: int = 2,
    background: Colour = WHITE,
    **settings: Any,
) -> dict[str, Any]:
    """One protocol by name, given only the arguments it takes (`background`: what transparent images
    are composited over)."""
    protocol = PROTOCOLS[task]
    why_not = no_patch_tokens(task, pretrained)
    if why_not:
        raise ConfigError(why_not)
    extra: dict[str, Any] = {"background": background}
    if protocol.loads:
        extra["num_workers"] = num_workers
    if protocol.trains and train_spec:
        extra["train_spec"] = train_spec
    if protocol.caches:
        extra["cache_dir"] = cache_dir
    if task == "attention" and maps_dir is not None:
        extra["out_dir"] = maps_dir
    return protocol.run(pretrained, data_spec, device, **extra, **settings)


def no_patch_tokens(task: str, pretrained: Pretrained) -> str:
    """Why `task` cannot run on these weights (it reads patch tokens, a CNN image tower has none), or ''."""
    reads = PROTOCOLS[task].patch_tokens
    if not reads or isinstance(pretrained.model.visual, VisionTower):
        return ""
    return (
        f"harmony eval {task} reads {reads}; the CNN image tower {pretrained.config.model.vision} has no patch "
        "tokens (one pooled feature per image): zeroshot, retrieval, knn, linear and finetune work on it"
    )


def run_suite(
    pretrained: Pretrained,
    device: torch.device,
    out_dir: Path,
    data_spec: str = "builtin:shapes:val",
    tasks: Sequence[str] = tuple(PROTOCOLS),
    train_spec: str | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    cache_dir: Path | None = None,
    num_workers: int = 2,
    echo: bool = True,
    data_for: Mapping[str, str] | None = None,
    background: Colour = WHITE,
) -> dict[str, dict[str, Any]]:
    """Every requested protocol; `<out_dir>/<task>.json` each, maps in `<out_dir>/maps`.

    All tasks read `data_spec` unless `data_for` names another spec for a task (e.g. an ADE20K folder
    for `segment`; its training split is then derived from it). Text protocols are recorded as
    skipped for a vision-only checkpoint."""
    unknown = [t for t in tasks if t not in PROTOCOLS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; known: {list(PROTOCOLS)}")
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        if PROTOCOLS[task].needs_text and not pretrained.model.has_text:
            results[task] = {"task": task, "skipped": f"no text tower in the {pretrained.weights} weights"}
            continue
        if no_patch_tokens(task, pretrained):
            results[task] = {"task": task, "skipped": no_patch_tokens(task, pretrained)}
            continue
        own = (data_for or {}).get(task)
        result = run_task(
            task,
            pretrained,
            own or data_spec,
            device,
            train_spec=None if own else train_spec,
            cache_dir=cache_dir,
            maps_dir=out_dir / "maps",
            num_workers=num_workers,
            background=background,
            **(settings or {}).get(task, {}),
        )
        write_result(out_dir / f"{task}.json", result)
        if echo:
            print(result_table(result), flush=True)
            report_skips(result)
        results[task] = result
    return results


def run_label(checkpoint: Path, taken: set[str]) -> str:
    """A short unique name for a checkpoint: its run folder (for `<run>/checkpoints/x.pt`) or file stem."""
    base = checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.stem
    label, n = base or "checkpoint", 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    taken.add(label)
    return label
