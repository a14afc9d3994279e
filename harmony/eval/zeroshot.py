"""Zero-shot classification: class names x prompt templates -> mean normalised text embeddings,
images classified by cosine similarity; top-1 / top-5 accuracy.

Templates and class names come from a named set or a file with one entry per line: template sets
`default` (short, for the built-in shapes), `openai` (CLIP's 80 ImageNet prompts) and `simple` (its
7-prompt subset), class-name set `imagenet` (both from open_clip's metadata). Without a class-name
set, an image folder's sub-folder names are the classes; in the prompts their `_` and `-` read as
spaces (`signs_and_symbols` -> "a photo of a signs and symbols.").
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from harmony.core.colors import WHITE
from harmony.core.errors import CheckpointError, ConfigError
from harmony.eval import settings
from harmony.eval.datasets import LabelledImages, extract, open_labelled, subset
from harmony.eval.images import Colour, Skips
from harmony.eval.metrics import per_class_recall, topk_accuracy
from harmony.eval.report import make_result
from harmony.loading import Pretrained
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer

DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a drawing of a {}.",
    "a rendering of the {}.",
    "a close-up photo of a {}.",
    "a {} shape.",
]


@dataclass(frozen=True)
class ZeroShotSettings:
    templates: str = field(default="default", metadata={"help": "template set (default/openai/simple) or file"})
    classnames: str = field(
        default="",
        metadata={
            "help": "class-name set (imagenet) or file, one name per line in sorted class-folder order; "
            "'' = the class folder names, _ and - read as spaces"
        },
    )
    max_eval: int = settings.max_eval()
    batch_size: int = field(default=256, metadata={"help": "image batch"})


ZEROSHOT_FULL = ZeroShotSettings()


def read_lines(path: str | Path) -> list[str]:
    """Non-blank stripped lines of a text file; DataError when it cannot be read."""
    from harmony.data.errors import DataError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read '{path}' ({getattr(exc, 'strerror', None) or exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def prompt_name(folder_name: str) -> str:
    """A class folder's name as it reads in a prompt: `_` and `-` become spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[_-]+", " ", folder_name)).strip() or folder_name


def template_set(name: str) -> list[str]:
    """A named template set or a file of templates ('{}' stands for the class name)."""
    from open_clip import zero_shot_metadata as meta

    named = {
        "default": DEFAULT_TEMPLATES,
        "openai": [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES],
        "simple": [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES],
    }
    if name in named:
        return list(named[name])
    if not Path(name).is_file():
        raise ConfigError(f"templates '{name}' is neither a named set ({', '.join(named)}) nor a file")
    templates = read_lines(name)
    if not all("{}" in t for t in templates):
        raise ConfigError(f"every template in '{name}' needs a '{{}}' for the class name")
    return templates


def class_name_set(name: str) -> list[str]:
    """The named set `imagenet` or a file with one class name per line (in the dataset's class order)."""
    from open_clip import zero_shot_metadata as meta

    if name == "imagenet":
        return list(meta.IMAGENET_CLASSNAMES)
    if not Path(name).is_file():
        raise ConfigError(f"classnames '{name}' is neither the named set imagenet nor a file")
    return read_lines(name)


def prompt_tokens(
    tokenizer: CaptionTokenizer, class_names: Sequence[str], templates: Sequence[str]
) -> list[torch.Tensor]:
    """Per class, the token ids of its prompts (one row per template)."""
    return [tokenizer([t.format(name) for t in templates]) for name in class_names]


@torch.no_grad()
def embed_prompts(model: ImageTextModel, tokens: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """[C, E]: per class, the normalised mean of its prompts' normalised embeddings."""
    rows = [F.normalize(model.encode_text(ids.to(device)).float().mean(dim=0), dim=-1) for ids in tokens]
    return torch.stack(rows)


def class_embeddings(
    model: ImageTextModel,
    tokenizer: CaptionTokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
) -> torch.Tensor:
    """[C, E]: per class, the normalised mean of the normalised template embeddings."""
    return embed_prompts(model, prompt_tokens(tokenizer, class_names, templates), device)


def class_prompt_names(s: ZeroShotSettings, data: LabelledImages) -> list[str]:
    """The names the prompts use: the `classnames` set or file, else the class folders' names."""
    names = class_name_set(s.classnames) if s.classnames else [prompt_name(n) for n in data.class_names]
    if len(names) != len(data.class_names):
        raise ConfigError(f"{len(names)} class names given for a dataset with {len(data.class_names)} classes")
    return names


def zeroshot_scores(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[dict[str, float], list[float | None]]:
    """(top-1, top-5, mean per-class recall and chance; each class's recall, None for a class without images)."""
    metrics = topk_accuracy(logits, labels)
    recalls = per_class_recall(logits, labels)
    present = [r for r in recalls if r is not None]
    metrics["mean_per_class_recall"] = sum(present) / len(present)
    metrics["chance"] = 1.0 / num_classes
    return metrics, recalls


def run_zeroshot(
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    prompt_names: Sequence[str] | None = None,
    prompt_templates: Sequence[str] | None = None,
    num_workers: int = 2,
    background: Colour = WHITE,
    **overrides: Any,
) -> dict[str, Any]:
    """Top-1/top-5 of zero-shot classification. Explicit `prompt_names` / `prompt_templates` lists beat
    the `classnames` / `templates` settings (which name a set or a file)."""
    started = time.perf_counter()
    s = settings.resolve(ZeroShotSettings(), ZEROSHOT_FULL, data_spec, overrides)
    model, tokenizer = pretrained.model, pretrained.tokenizer
    if tokenizer is None or not model.has_text:
        raise CheckpointError(
            f"checkpoint '{pretrained.path}' has no text tower ({pretrained.weights}); zero-shot needs one"
        )
    data = subset(open_labelled(data_spec, pretrained.config, background), s.max_eval)
    names = list(prompt_names) if prompt_names else class_prompt_names(s, data)
    if len(names) != len(data.class_names):
        raise ConfigError(f"{len(names)} class names given for a dataset with {len(data.class_names)} classes")
    prompts = list(prompt_templates or template_set(s.templates))
    weights = class_embeddings(model, tokenizer, names, prompts, device)
    skips = Skips()
    feats, labels = extract(model.encode_image, data, pretrained.image_size, device, s.batch_size, num_workers, skips)
    metrics, recalls = zeroshot_scores(feats @ weights.cpu().t(), labels, len(names))
    counts = torch.bincount(labels, minlength=len(names)).tolist()
    per_class = {c: {"recall": r, "images": n} for c, r, n in zip(data.class_names, recalls, counts)}
    dataset = {
        "spec": data_spec,
        "num_images": len(labels),
        "num_classes": len(names),
        "class_names": data.class_names,
        "prompt_names": names,
        "skipped": skips.as_dict(),
    }
    return make_result(
        "zeroshot", pretrained, dataset, s, metrics, started, background, templates=prompts, per_class=per_class
    )
