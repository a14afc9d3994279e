"""Evaluation during training (`train.eval_every`): `harmony eval`'s zero-shot, k-NN and retrieval on the
student and the EMA teacher, with the same settings (`eval.<task>.<flag name>`) and the same code.

The evaluation sets are opened, decoded and cut to the eval view once, when the run starts (a missing folder
is a one-line error before the first step), and the class prompts and captions tokenised; an evaluation only
runs the models. Each process decodes and encodes a contiguous share of every set's batches (the batches
`harmony eval` makes) and the features are gathered in order, so the numbers equal one process's. The weights
are loaded into models of their own (`harmony.loading.model_for`, as `harmony eval` loads a checkpoint), so
training's modules, their modes and their BatchNorm statistics are never touched.

Rows: `eval/<student|teacher>/<task>_<metric>`, and `eval/<task>_<metric>` for the weights `harmony eval`
reads by default (the teacher when it has every tower the student has). A teacher without a text tower is
scored on k-NN only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from harmony.config import Config
from harmony.core.checkpoint import load_state_strict
from harmony.core.colors import parse_background
from harmony.core.distributed import DistInfo, gather_objects
from harmony.core.errors import ConfigError
from harmony.eval.captions import TableColumns, open_captioned
from harmony.eval.datasets import (
    LabelledImages,
    encode_batches,
    eval_batches,
    labelled_splits,
    open_labelled,
    pick,
    subset,
)
from harmony.eval.features import token_summary
from harmony.eval.images import Colour, Skips, require_some
from harmony.eval.knn import KNN_FULL, KnnSettings, check_ks, knn_metrics, neighbour_counts
from harmony.eval.retrieval import (
    RETRIEVAL_FULL,
    RetrievalSettings,
    caption_owners,
    embed_pair_batch,
    pair_batches,
    recall_metrics,
)
from harmony.eval.settings import from_config
from harmony.eval.zeroshot import (
    ZEROSHOT_FULL,
    ZeroShotSettings,
    class_prompt_names,
    embed_prompts,
    prompt_tokens,
    template_set,
    zeroshot_scores,
)
from harmony.loading import model_for
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer
from harmony.train.watch import Weights

Batches = list[tuple[torch.Tensor, ...]]


class _Sets:
    """What every task shares: the config, this process's place, the tokenizer, how images are read."""

    def __init__(self, cfg: Config, dist: DistInfo, device: torch.device) -> None:
        self.cfg, self.dist, self.device = cfg, dist, device
        self.tokenizer = CaptionTokenizer(cfg.model.context_length)
        self.background: Colour = parse_background(cfg.data.alpha_background)
        self.image_size = cfg.data.augment.global_size

    def share(self, index: Sequence[int], batch_size: int) -> list[int]:
        """This process's contiguous run of whole batches of `index`."""
        batches = math.ceil(len(index) / batch_size)
        first = batches * self.dist.rank // self.dist.world_size
        last = batches * (self.dist.rank + 1) // self.dist.world_size
        return list(index[first * batch_size : last * batch_size])

    def decoded(self, data: LabelledImages, batch_size: int) -> Batches:
        """This process's share of a labelled set as (uint8 views, labels) batches, decoded once."""
        skips = Skips()
        share = self.share(range(len(data)), batch_size)
        batches = [
            tuple(b) for b in eval_batches(data, self.image_size, batch_size, self.cfg.eval.workers, skips, share)
        ]
        self.check_readable(sum(len(b[1]) for b in batches), skips, data.name)
        return batches

    def check_readable(self, count: int, skips: Skips, name: str) -> None:
        """DataError when no process read an image of `name`; one line naming those skipped."""
        counts = gather_objects((count, len(skips), skips.examples[:1]))
        skipped = sum(c[1] for c in counts)
        if sum(c[0] for c in counts) == 0:
            require_some(0, skips, name)
        if skipped and self.dist.is_main:
            first = next(c[2][0] for c in counts if c[2])
            print(f"eval: skipped {skipped} unreadable image(s) of '{name}'; first: {first}", file=sys.stderr)

    def gathered(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """This process's rows, then every process's in process order: the rows of the whole set."""
        mine = torch.cat(list(parts)) if parts else None
        return torch.cat([rows for rows in gather_objects(mine) if rows is not None])

    def encoded(
        self, encode: Callable[[torch.Tensor], torch.Tensor], batches: Batches
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of a decoded set, every process's share gathered."""
        feats, labels = encode_batches(encode, batches, self.device)
        return self.gathered(feats), self.gathered(labels)


class _ZeroShot:
    """`harmony eval zeroshot`: its images decoded and its class prompts tokenised once; `score` embeds both."""

    task, needs_text = "zeroshot", True

    def __init__(self, sets: _Sets) -> None:
        spec = sets.cfg.eval.zeroshot_data
        s = from_config(ZeroShotSettings(), ZEROSHOT_FULL, spec, sets.cfg.eval.zeroshot, "eval.zeroshot")
        data = subset(open_labelled(spec, sets.cfg, sets.background), s.max_eval)
        self.sets, self.num_classes = sets, len(data.class_names)
        self.tokens = prompt_tokens(sets.tokenizer, class_prompt_names(s, data), template_set(s.templates))
        self.images = sets.decoded(data, s.batch_size)
        self.names = ["top1", "top5", "mean_per_class_recall"]

    def score(self, model: ImageTextModel) -> dict[str, float]:
        classes = embed_prompts(model, self.tokens, self.sets.device)
        feats, labels = self.sets.encoded(model.encode_image, self.images)
        metrics, _ = zeroshot_scores(feats @ classes.cpu().t(), labels, self.num_classes)
        return {name: metrics[name] for name in self.names}


class _Knn:
    """`harmony eval knn`: both splits decoded once; `score` takes their token summaries and votes."""

    task, needs_text = "knn", False

    def __init__(self, sets: _Sets) -> None:
        spec = sets.cfg.eval.knn_val
        s = from_config(KnnSettings(), KNN_FULL, spec, sets.cfg.eval.knn, "eval.knn")
        try:
            check_ks(s.ks)
        except ConfigError:
            raise ConfigError(f"config key 'eval.knn.ks' needs positive numbers of neighbours, got {s.ks}") from None
        splits = labelled_splits(
            sets.cfg, spec, sets.cfg.eval.knn_train or None, sets.background, s.max_train, s.max_eval
        )
        self.sets, self.settings, self.num_classes = sets, s, splits.num_classes
        self.train = sets.decoded(splits.train, s.batch_size)
        self.test = sets.decoded(splits.test, s.batch_size)
        num_train = sum(gather_objects(sum(len(b[1]) for b in self.train)))
        if sets.dist.is_main:
            neighbour_counts(s.ks, num_train)  # its warning for a k above the training images
        self.capped = [min(k, num_train) for k in s.ks]
        self.names = ["top1", "top5"]
        if len(s.ks) > 1:
            self.names += [f"k{k}_{top}" for k in s.ks for top in ("top1", "top5")]

    def score(self, model: ImageTextModel) -> dict[str, float]:
        def summaries(batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
            feats, labels = self.sets.encoded(lambda images: token_summary(model.visual, images), batches)
            return feats.half().float(), labels  # as `harmony eval knn` keeps them (its feature cache)

        used = sorted(set(self.capped))
        values = knn_metrics(
            summaries(self.train), summaries(self.test), used, self.settings.temperature, self.num_classes
        )
        out = {"top1": values[f"k{self.capped[0]}_top1"], "top5": values[f"k{self.capped[0]}_top5"]}
        if len(self.capped) > 1:
            for k, capped in zip(self.settings.ks, self.capped):
                out[f"k{k}_top1"], out[f"k{k}_top5"] = values[f"k{capped}_top1"], values[f"k{capped}_top5"]
        return out


class _Retrieval:
    """`harmony eval retrieval`: the images decoded and their captions tokenised once; `score` ranks both ways."""

    task, needs_text = "retrieval", True

    def __init__(self, sets: _Sets) -> None:
        spec = sets.cfg.eval.retrieval_data
        s = from_config(RetrievalSettings(), RETRIEVAL_FULL, spec, sets.cfg.eval.retrieval, "eval.retrieval")
        if not s.ks or any(k < 1 for k in s.ks):
            raise ConfigError(f"config key 'eval.retrieval.ks' needs positive recall cut-offs, got {s.ks}")
        columns = TableColumns(s.image_key, s.caption_key, s.separator)
        data = open_captioned(spec, sets.cfg, s.captions_per_image, None, s.split, columns, sets.background)
        share = sets.share(pick(len(data), s.max_images), s.batch_size)
        skips = Skips()
        skips.merge(data.skipped)
        self.sets, self.ks = sets, s.ks
        self.batches: Batches = []
        for pixels, captions in pair_batches(data, share, sets.image_size, s.batch_size, sets.cfg.eval.workers, skips):
            ids = sets.tokenizer([c for group in captions for c in group])
            self.batches.append((pixels, ids, torch.tensor([len(group) for group in captions])))
        sets.check_readable(sum(len(b[2]) for b in self.batches), skips, data.name)
        self.names = [f"{way}_r{k}" for way in ("i2t", "t2i") for k in s.ks] + ["mean_recall"]

    def score(self, model: ImageTextModel) -> dict[str, float]:
        images, texts = [], []
        for pixels, ids, _ in self.batches:
            image_emb, text_emb = embed_pair_batch(model, pixels, ids, self.sets.device)
            images.append(image_emb)
            texts.append(text_emb)
        counts = self.sets.gathered([b[2] for b in self.batches])
        owners = caption_owners(counts.tolist())
        metrics = recall_metrics(self.sets.gathered(images), self.sets.gathered(texts), owners, self.ks)
        return {name: metrics[name] for name in self.names}


TASKS: dict[str, Callable[[_Sets], Any]] = {"zeroshot": _ZeroShot, "knn": _Knn, "retrieval": _Retrieval}
DATA_KEYS = {"zeroshot": "eval.zeroshot_data", "knn": "eval.knn_val", "retrieval": "eval.retrieval_data"}


class DuringTraining:
    """The run's evaluation (`harmony.train.watch.Evaluation`; the class is the `EvaluationBuilder` that
    `harmony train` hands to the trainer): its sets decoded once, scored on each call."""

    def __init__(self, cfg: Config, dist: DistInfo, device: torch.device, towers: dict[str, bool]) -> None:
        self.cfg, self.device, self.towers = cfg, device, towers
        sets = _Sets(cfg, dist, device)
        for task in cfg.eval.tasks():
            if TASKS[task] is not _Knn and not towers["student"]:
                raise ConfigError(
                    f"config key '{DATA_KEYS[task]}': {task} needs a text tower, and method '{cfg.name}' trains none"
                )
        self.tasks = [TASKS[task](sets) for task in cfg.eval.tasks()]
        teacher_complete = "teacher" in towers and (towers["teacher"] or not towers["student"])
        self.default = "teacher" if teacher_complete else "student"
        self.models: dict[str, ImageTextModel] = {}

    def _scored(self, kind: str) -> list[Any]:
        return [task for task in self.tasks if self.towers[kind] or not task.needs_text]

    def metric_names(self) -> list[str]:
        names = [f"eval/{k}/{t.task}_{m}" for k in self.towers for t in self._scored(k) for m in t.names]
        return names + [f"eval/{t.task}_{m}" for t in self._scored(self.default) for m in t.names] + ["eval/time_s"]

    def _model(self, kind: str, state: dict[str, torch.Tensor]) -> ImageTextModel:
        if kind not in self.models:
            self.models[kind] = model_for(self.cfg, state)[0].to(self.device)
        model = self.models[kind]
        load_state_strict(model, state, f"the {kind} of this run")
        return model

    @torch.no_grad()
    def __call__(self, weights: Weights) -> dict[str, float]:
        scored: dict[str, float] = {}
        for kind, state in weights.items():
            model = self._model(kind, state)
            for task in self._scored(kind):
                scored |= {f"eval/{kind}/{task.task}_{name}": value for name, value in task.score(model).items()}
        prefix = f"eval/{self.default}/"
        return {f"eval/{k[len(prefix) :]}": v for k, v in scored.items() if k.startswith(prefix)} | scored
