"""What objectives declare and receive.

An objective declares the forward passes it reads (`Needs`); the task unions the needs of all enabled
objectives, runs each distinct pass once (student and teacher), and hands every objective the same
`Encoded` outputs. Objectives own their heads/decoders (and teacher copies of heads) and return an
unweighted loss plus metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict, TypeVar

import torch
from torch import nn

from harmony.config import Config
from harmony.models.sizes import TEXT_SIZES, VISION_SIZES
from harmony.objective_config import HeadConfig


@dataclass(frozen=True)
class BlockMasks:
    """iBOT's block-mask recipe for the global crops (see `harmony.data.masking.block_mask`)."""

    probability: float
    ratio_min: float
    ratio_max: float
    min_patches: int
    aspect_min: float


@dataclass
class Needs:
    """The views and forward passes one objective reads; the task and the data layer serve their union.

    `num_global` global crops are made; `block_masks` asks the data layer for iBOT masks on each of them
    (and the student for a mask token); `keep_ratio` / `text_mask_prob` are the MAE-style patch dropping
    and caption masking recipes; `embeddings` asks for the CLIP embeddings of crop 0 and the caption, taken
    from crop 0's patch-dropped pass when `embeddings_dropped` (FLIP) and from its clean pass otherwise."""

    num_global: int = 1
    clean_crops: set[int] = field(default_factory=set)
    masked_crops: bool = False
    local_crops: int = 0
    dropped_crops: set[int] = field(default_factory=set)
    keep_ratio: float = 0.0
    teacher_crops: set[int] = field(default_factory=set)
    text_clean: bool = False
    text_masked: bool = False
    teacher_text: bool = False
    text_mask_prob: float = 0.0
    block_masks: BlockMasks | None = None
    embeddings: bool = False
    embeddings_dropped: bool = False

    def union(self, other: Needs) -> Needs:
        if self.dropped_crops and other.dropped_crops and self.keep_ratio != other.keep_ratio:
            raise ValueError("two objectives drop patches with different keep ratios; they must share one")
        if self.text_masked and other.text_masked and self.text_mask_prob != other.text_mask_prob:
            raise ValueError("two objectives mask captions with different probabilities; they must share one")
        if self.block_masks and other.block_masks and self.block_masks != other.block_masks:
            raise ValueError("two objectives ask for different iBOT block masks; they must share one recipe")
        if self.embeddings and other.embeddings and self.embeddings_dropped != other.embeddings_dropped:
            raise ValueError(
                "two objectives read the image embedding, one of the full image and one of the patch-dropped image"
            )
        return Needs(
            num_global=max(self.num_global, other.num_global),
            clean_crops=self.clean_crops | other.clean_crops,
            masked_crops=self.masked_crops or other.masked_crops,
            local_crops=max(self.local_crops, other.local_crops),
            dropped_crops=self.dropped_crops | other.dropped_crops,
            keep_ratio=self.keep_ratio or other.keep_ratio,
            teacher_crops=self.teacher_crops | other.teacher_crops,
            text_clean=self.text_clean or other.text_clean,
            text_masked=self.text_masked or other.text_masked,
            teacher_text=self.teacher_text or other.teacher_text,
            text_mask_prob=self.text_mask_prob or other.text_mask_prob,
            block_masks=self.block_masks or other.block_masks,
            embeddings=self.embeddings or other.embeddings,
            embeddings_dropped=self.embeddings_dropped or other.embeddings_dropped,
        )

    def output_keys(self) -> set[str]:
        """The flat names (`Encoded.batched`) of the per-sample outputs `PretrainTask.encode` makes for these needs."""
        keys = {"images"} | {f"clean.{g}" for g in self.clean_crops} | {f"dropped.{g}" for g in self.dropped_crops}
        flags = {
            "masked": self.masked_crops,
            "local": self.local_crops > 0,
            "teacher": bool(self.teacher_crops),
            "text": self.text_clean,
            "text_masked": self.text_masked,
            "teacher_text": self.teacher_text,
            "image_embed": self.embeddings,
            "text_embed": self.embeddings,
            "teacher_image_embed": self.embeddings and self.teacher_text and bool(self.teacher_crops),
            "teacher_text_embed": self.embeddings and self.teacher_text and bool(self.teacher_crops),
        }
        return keys | {name for name, wanted in flags.items() if wanted}

    @property
    def needs_text(self) -> bool:
        return self.text_clean or self.text_masked or self.teacher_text

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_crops) or self.teacher_text


@dataclass
class StepInfo:
    """Where training is: schedules inside objectives read `epoch` (fractional) and `step`."""

    step: int
    steps_per_epoch: int

    @property
    def epoch(self) -> float:
        return self.step / max(self.steps_per_epoch, 1)


Batch = TypedDict(
    "Batch",
    {
        "global": torch.Tensor,  # global crops [G, B, 3, H, W] (uint8 or float, not yet normalised)
        "local": torch.Tensor,  # local crops [L, B, 3, h, w]
        "ibot_mask": torch.Tensor,  # iBOT block masks [G, B, gh, gw] bool
        "ibot_index": torch.Tensor,  # flat indices of the masked patches in [G, B, gh * gw]
        "ibot_weight": torch.Tensor,  # per masked patch 1 / (masked patches in its image x B x G)
        "mae_keep": torch.Tensor,  # kept patch indices of the dropped crops [D, B, K]
        "mae_remove": torch.Tensor,  # removed patch indices [D, B, N - K]
        "text": torch.Tensor,  # caption token ids [B, T]: T the batch's longest caption, rounded up to 8
        "text_real": torch.Tensor,  # real (non-padding) positions [B, T] bool
        "text_real_index": torch.Tensor,  # flat indices of the real positions
        "text_masked": torch.Tensor,  # caption ids with [MASK]s [B, T]
        "text_mask": torch.Tensor,  # masked positions [B, T] bool
        "mlm_index": torch.Tensor,  # flat indices of the masked positions in [B, T]
        "mlm_in_real": torch.Tensor,  # where each masked position sits among the real ones
        "text_distill_weight": torch.Tensor,  # per masked token 1 / (masked tokens in its caption x B)
    },
    total=False,
)
"""The typed contract between the data layer and the objectives: what `collate` produces (flat indices and
weights included, so the step never synchronises with the host). Keys are present when a `Needs` asks."""


class MissingPassError(RuntimeError):
    """An objective read an output of a forward pass that no enabled objective's `Needs` asked for."""


class Encoded:
    """Outputs of the shared forward passes of one step (token tensors are [B, 1 + N, D], CLS first).

    Every attribute is typed as present, so objectives read them without checks; one that the union of
    `Needs` did not ask for raises `MissingPassError` naming the `Needs` field that produces it. `has(name)`
    says whether an output was computed. `BATCH_DIM` gives each batched output's sample dimension."""

    images: torch.Tensor  # normalised global crops [G, B, 3, H, W]
    grid: tuple[int, int]
    pos_embed: torch.Tensor  # the student's position table for the global grid [1, 1 + N, D]
    clean: dict[int, torch.Tensor]  # crop -> [B, 1 + N, D]
    masked: torch.Tensor  # [G, B, 1 + N, D]
    local: torch.Tensor  # [L, B, 1 + n, D]
    dropped: dict[int, torch.Tensor]  # crop -> [B, 1 + K, D]
    teacher: torch.Tensor  # [G', B, 1 + N, D], no grad
    text: torch.Tensor  # [B, T, W] clean caption, student
    text_masked: torch.Tensor  # [B, T, W] masked caption, student
    teacher_text: torch.Tensor  # [B, T, W] clean caption, teacher
    image_embed: torch.Tensor  # student joint-space embedding of crop 0 [B, E]
    text_embed: torch.Tensor  # [B, E]
    teacher_image_embed: torch.Tensor
    teacher_text_embed: torch.Tensor
    logit_scale: torch.Tensor  # exp(logit_scale), 0-d

    PRODUCED_BY: ClassVar[dict[str, str]] = {
        "images": "num_global",
        "pos_embed": "dropped_crops",
        "masked": "masked_crops",
        "local": "local_crops",
        "teacher": "teacher_crops",
        "text": "text_clean",
        "text_masked": "text_masked",
        "teacher_text": "teacher_text",
        "image_embed": "embeddings",
        "text_embed": "embeddings",
        "teacher_image_embed": "teacher_text and teacher_crops with embeddings",
        "teacher_text_embed": "teacher_text and teacher_crops with embeddings",
        "logit_scale": "embeddings",
    }
    BATCH_DIM: ClassVar[dict[str, int]] = {
        "images": 1,
        "masked": 1,
        "local": 1,
        "teacher": 1,
        "text": 0,
        "text_masked": 0,
        "teacher_text": 0,
        "image_embed": 0,
        "text_embed": 0,
        "teacher_image_embed": 0,
        "teacher_text_embed": 0,
    }

    def __init__(self, **outputs: Any) -> None:
        self.grid = (0, 0)
        self.clean = {}
        self.dropped = {}
        for name, value in outputs.items():
            if name not in self.PRODUCED_BY and name not in ("grid", "clean", "dropped"):
                raise TypeError(f"Encoded has no output {name!r}")
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:  # only reached for outputs that were never set
        if name in self.PRODUCED_BY:
            raise MissingPassError(
                f"Encoded.{name} was not computed: the objective reading it must ask for it in its Needs "
                f"({self.PRODUCED_BY[name]})"
            )
        raise AttributeError(name)

    def has(self, name: str) -> bool:
        """Whether the output `name` was computed this step."""
        return name in self.__dict__

    def batched(self) -> dict[str, torch.Tensor]:
        """Every computed per-sample output under a flat name (`clean.0`, `teacher`, ...): what gradient
        accumulation caches and concatenates (along `batch_dim(name)`)."""
        out = {name: getattr(self, name) for name in self.BATCH_DIM if self.has(name)}
        out |= {f"clean.{g}": t for g, t in self.clean.items()} | {f"dropped.{g}": t for g, t in self.dropped.items()}
        return out

    @classmethod
    def from_batched(cls, outputs: dict[str, torch.Tensor], **shared: Any) -> Encoded:
        """The inverse of `batched`, plus the outputs shared by all samples (`grid`, `logit_scale`, `pos_embed`)."""
        enc = cls(**shared)
        for key, value in outputs.items():
            kind, _, crop = key.partition(".")
            if crop:
                getattr(enc, kind)[int(crop)] = value
            else:
                setattr(enc, key, value)
        return enc

    @classmethod
    def batch_dim(cls, key: str) -> int:
        """The sample dimension of the flat output `key`."""
        return 0 if "." in key else cls.BATCH_DIM[key]


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelDims:
    """What an objective's heads and decoders are sized from: the model widths and the vocabulary."""

    vision_width: int
    patch_size: int
    text_width: int
    vocab_size: int
    head: HeadConfig

    @classmethod
    def of(cls, cfg: Config, vocab_size: int) -> ModelDims:
        vision = VISION_SIZES[cfg.model.vision]
        return cls(vision.embed_dim, vision.patch_size, TEXT_SIZES[cfg.model.text].width, vocab_size, cfg.model.head)


class Objective(nn.Module):
    """Base class of every pre-training objective: a plug-in found through the registry.

    A subclass declares `key` (its section under `objectives.` in the config), `config_type` (that
    section's dataclass in `harmony.config`, which carries the section's own checks), `needs_for`
    (the views and passes it reads, from its section alone, so the data layer needs no modules),
    `build` (the objective with its heads/decoders, sized from `ModelDims`) and `forward(encoded,
    batch, step) -> LossOutput` (unweighted loss + metrics). It may own EMA'd heads (`ema_pairs`),
    per-step state (`after_step`), frozen parameters, and names its parts for the FLOP breakdown
    (`flop_parts`). Decorate it with `@register` to plug it in.
    """

    key: ClassVar[str] = ""
    config_type: ClassVar[type] = object
    # True when the loss couples the samples of a batch (a contrast over the batch, BatchNorm in a head): with
    # gradient accumulation it is computed once on the whole batch's cached tower outputs (GradCache), while a
    # per-sample loss runs inside each micro-batch
    batch_coupled: ClassVar[bool] = False
    cfg: Any

    @classmethod
    def needs_for(cls, section: Any) -> Needs:
        """What this objective reads, given its config section."""
        raise NotImplementedError

    @classmethod
    def build(cls, section: Any, dims: ModelDims) -> Objective:
        """The objective and its modules for `section`."""
        raise NotImplementedError

    def needs(self) -> Needs:
        return self.needs_for(self.cfg)

    def flop_parts(self) -> dict[str, list[nn.Module]]:
        """{component label: modules} for `harmony bench`'s FLOP breakdown; "heads" collects every head."""
        return {}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher module, student module) pairs this objective owns, for the EMA update."""
        return []

    def after_step(self) -> None:
        """Advance per-step state (centres) once per optimiser step."""

    def frozen_parameters(self, step: StepInfo) -> list[nn.Parameter]:
        """Parameters whose gradients are zeroed at this step (DINO's last-layer freeze)."""
        return []

    def micro_batch_share(self, micro: Batch, full: Batch) -> torch.Tensor | float:
        """With gradient accumulation, the weight of this (per-sample) objective's loss on micro-batch `micro`
        in its loss on the whole batch `full`: the micro-batch's share of the samples, as for a mean over
        samples; an objective normalised otherwise (MLM: by the masked-token count) says so here."""
        return micro["global"].shape[1] / full["global"].shape[1]


ObjectiveType = TypeVar("ObjectiveType", bound=type[Objective])

REGISTRY: dict[str, type[Objective]] = {}


def register(cls: ObjectiveType) -> ObjectiveType:
    """Class decorator: plug an objective in under its config key."""
    if not cls.key or cls.key in REGISTRY:
        raise ValueError(f"objective {cls.__name__} needs a unique config key, got {cls.key!r}")
    REGISTRY[cls.key] = cls
    return cls
