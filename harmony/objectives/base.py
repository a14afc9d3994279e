"""What objectives declare and receive.

An objective declares the forward passes it reads (`Needs`); the task unions the needs of all enabled
objectives, runs each distinct pass once (student and teacher), and hands every objective the same
`Encoded` outputs. Objectives own their heads/decoders (and teacher copies of heads) and return an
unweighted loss plus metrics.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, ClassVar, TypedDict, TypeVar, get_type_hints

import torch
from torch import Tensor, nn

from harmony.config import Config
from harmony.models.cnn import cnn_width
from harmony.objective_config import HeadConfig


@dataclass(frozen=True)
class BlockMasks:
    """iBOT's block-mask recipe for the global crops (see `harmony.data.masking.block_mask`)."""

    probability: float
    ratio_min: float
    ratio_max: float
    min_patches: int
    aspect_min: float


# how the values two objectives give a `Needs` field combine (`Needs.union`): the larger count, or the union of
# the sets / of the flags; a recipe (`shared_recipe`) is the value of the objectives that use it, which must agree
LARGER = {"merge": max}
UNION = {"merge": operator.or_}


def shared_recipe(used_with: str, conflict: str) -> dict[str, Any]:
    """The merge rule of a recipe that every objective using it (`used_with` set) must agree on: one pass serves
    them all, so a difference is refused with `conflict`."""
    return {"merge": lambda mine, theirs: mine or theirs, "used_with": used_with, "conflict": conflict}


@dataclass
class Needs:
    """The views and forward passes one objective reads; the task and the data layer serve their union.

    `num_global` global crops are made; `global_crops` runs every one of them through the student in one
    stacked pass, through iBOT's block masks when `block_masks` asks the data layer for them (and the student
    for a mask token), unmasked otherwise (DINO); `clean_crops` are the crops the student also sees without
    masks. `keep_ratio` / `text_mask_prob` are the MAE-style patch dropping and caption masking recipes;
    `embeddings` asks for the CLIP embeddings of crop 0 and the caption, taken from crop 0's patch-dropped
    pass when `embeddings_dropped` (FLIP) and from its clean pass otherwise; `token_embeddings` asks for every
    patch token of clean crop 0 and every caption token in the joint space (FILIP). `patch_tokens` says the
    objective reads the image tower's patch tokens, not only its pooled (CLS) row; block masks, dropped patches and
    token embeddings imply it (`reads_patch_tokens`), and a CNN image tower, which has none, refuses such an
    objective. Each field's metadata says how the values of two objectives combine (`union`)."""

    num_global: int = field(default=1, metadata=LARGER)
    clean_crops: set[int] = field(default_factory=set, metadata=UNION)
    global_crops: bool = field(default=False, metadata=UNION)
    local_crops: int = field(default=0, metadata=LARGER)
    dropped_crops: set[int] = field(default_factory=set, metadata=UNION)
    keep_ratio: float = field(
        default=0.0,
        metadata=shared_recipe(
            "dropped_crops", "two objectives drop patches with different keep ratios; they must share one"
        ),
    )
    teacher_crops: set[int] = field(default_factory=set, metadata=UNION)
    text_clean: bool = field(default=False, metadata=UNION)
    text_masked: bool = field(default=False, metadata=UNION)
    teacher_text: bool = field(default=False, metadata=UNION)
    text_mask_prob: float = field(
        default=0.0,
        metadata=shared_recipe(
            "text_masked", "two objectives mask captions with different probabilities; they must share one"
        ),
    )
    block_masks: BlockMasks | None = field(
        default=None,
        metadata=shared_recipe(
            "block_masks", "two objectives ask for different iBOT block masks; they must share one recipe"
        ),
    )
    embeddings: bool = field(default=False, metadata=UNION)
    embeddings_dropped: bool = field(
        default=False,
        metadata=shared_recipe(
            "embeddings",
            "two objectives read the image embedding, one of the full image and one of the patch-dropped image",
        ),
    )
    token_embeddings: bool = field(default=False, metadata=UNION)

    patch_tokens: bool = field(default=False, metadata=UNION)

    def union(self, other: Needs) -> Needs:
        """What serves both: each field merged by its rule; a recipe both use must be the same."""
        merged = {}
        for spec in fields(self):
            mine, theirs = getattr(self, spec.name), getattr(other, spec.name)
            used_with = spec.metadata.get("used_with")
            if used_with and getattr(self, used_with) and getattr(other, used_with) and mine != theirs:
                raise ValueError(spec.metadata["conflict"])
            merged[spec.name] = spec.metadata["merge"](mine, theirs)
        return Needs(**merged)

    @classmethod
    def union_of(cls, parts: Iterable[Needs]) -> Needs:
        """The union of any number of needs (nothing asked: the defaults)."""
        return functools.reduce(cls.union, parts, cls())

    @property
    def needs_text(self) -> bool:
        return self.text_clean or self.text_masked or self.teacher_text

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_crops) or self.teacher_text

    @property
    def reads_patch_tokens(self) -> bool:
        """Whether the image tower must give patch tokens (a ViT), not only a pooled feature."""
        return self.patch_tokens or self.token_embeddings or self.block_masks is not None or bool(self.dropped_crops)


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


class Output:
    """One row of the table of `Encoded` outputs: the `Needs` fields that must all be set for the task to compute
    it (`made_by`); its sample dimension (`batch_dim`), or `shared` when one value serves every sample (not cached
    by gradient accumulation); whether it is a dict crop -> tensor over the crops of its first `made_by` field
    (`per_crop`; flat names `clean.0`, ...); whether gradients flow back into it (`trained`: not the input
    images, not the teacher's outputs)."""

    def __init__(
        self, *made_by: str, batch_dim: int = 0, shared: bool = False, per_crop: bool = False, trained: bool = True
    ) -> None:
        self.made_by = made_by
        self.batch_dim = batch_dim
        self.shared = shared
        self.per_crop = per_crop
        self.trained = trained

    def made_for(self, needs: Needs) -> bool:
        """Whether the passes serving `needs` compute this output."""
        return all(getattr(needs, name) for name in self.made_by)


class Encoded:
    """Outputs of the shared forward passes of one step (token tensors are [B, 1 + N, D], CLS first).

    Each field is typed as present, so objectives read them without checks, and annotated with its `Output`
    row: one that the union of `Needs` did not ask for raises `MissingPassError` naming the `Needs` fields that
    produce it; `has(name)` says whether an output was computed. Per-sample outputs come first, in the order
    gradient accumulation caches them (`batched`)."""

    images: Annotated[Tensor, Output("num_global", batch_dim=1, trained=False)]  # normalised globals [G, B, 3, H, W]
    global_crops: Annotated[Tensor, Output("global_crops", batch_dim=1)]  # [G, B, 1 + N, D], iBOT-masked if masks
    local: Annotated[Tensor, Output("local_crops", batch_dim=1)]  # [L, B, 1 + n, D]
    teacher: Annotated[Tensor, Output("teacher_crops", batch_dim=1, trained=False)]  # [G', B, 1 + N, D], no grad
    text: Annotated[Tensor, Output("text_clean")]  # [B, T, W] clean caption, student
    text_masked: Annotated[Tensor, Output("text_masked")]  # [B, T, W] masked caption, student
    teacher_text: Annotated[Tensor, Output("teacher_text", trained=False)]  # [B, T, W] clean caption, teacher
    image_embed: Annotated[Tensor, Output("embeddings")]  # student joint-space embedding of crop 0 [B, E]
    text_embed: Annotated[Tensor, Output("embeddings")]  # [B, E]
    teacher_image_embed: Annotated[Tensor, Output("embeddings", "teacher_text", "teacher_crops", trained=False)]
    teacher_text_embed: Annotated[Tensor, Output("embeddings", "teacher_text", "teacher_crops", trained=False)]
    image_token_embed: Annotated[Tensor, Output("token_embeddings")]  # crop 0's patch tokens, joint space [B, N, E]
    text_token_embed: Annotated[Tensor, Output("token_embeddings")]  # every caption token, joint space [B, T, E]
    clean: Annotated[dict[int, Tensor], Output("clean_crops", per_crop=True)]  # crop -> [B, 1 + N, D]
    dropped: Annotated[dict[int, Tensor], Output("dropped_crops", per_crop=True)]  # crop -> [B, 1 + K, D]
    grid: Annotated[tuple[int, int], Output("num_global", shared=True)]  # patch grid (gh, gw)
    pos_embed: Annotated[Tensor, Output("dropped_crops", shared=True)]  # student position table [1, 1 + N, D]
    logit_scale: Annotated[Tensor, Output("embeddings", shared=True)]  # exp(logit_scale), 0-d

    OUTPUTS: ClassVar[dict[str, Output]]  # the table: every field's row, in field order

    def __init__(self, **outputs: Any) -> None:
        self.grid = (0, 0)
        self.clean = {}
        self.dropped = {}
        for name, value in outputs.items():
            if name not in self.OUTPUTS:
                raise TypeError(f"Encoded has no output {name!r}")
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:  # only reached for outputs that were never set
        if name in self.OUTPUTS:
            raise MissingPassError(
                f"Encoded.{name} was not computed: the objective reading it must ask for it in its Needs "
                f"({' and '.join(self.OUTPUTS[name].made_by)})"
            )
        raise AttributeError(name)

    def has(self, name: str) -> bool:
        """Whether the output `name` was computed this step."""
        return name in self.__dict__

    def batched(self) -> dict[str, torch.Tensor]:
        """Every computed per-sample output under a flat name (`clean.0`, `teacher`, ...): what gradient
        accumulation caches and concatenates (along their rows' `batch_dim`)."""
        out: dict[str, torch.Tensor] = {}
        for name, row in self.OUTPUTS.items():
            if row.shared or not self.has(name):
                continue
            value = getattr(self, name)
            out |= {f"{name}.{g}": t for g, t in value.items()} if row.per_crop else {name: value}
        return out

    @classmethod
    def batched_keys(cls, needs: Needs) -> set[str]:
        """The flat names (`batched`) of the per-sample outputs the passes serving `needs` compute."""
        keys: set[str] = set()
        for name, row in cls.OUTPUTS.items():
            if not row.shared and row.made_for(needs):
                keys |= {f"{name}.{g}" for g in getattr(needs, row.made_by[0])} if row.per_crop else {name}
        return keys

    @classmethod
    def from_batched(cls, outputs: dict[str, torch.Tensor], **shared: Any) -> Encoded:
        """The inverse of `batched`, plus the outputs shared by all samples (`grid`, `logit_scale`, `pos_embed`)."""
        enc = cls(**shared)
        for key, value in outputs.items():
            name, _, crop = key.partition(".")
            if crop:
                getattr(enc, name)[int(crop)] = value
            else:
                setattr(enc, key, value)
        return enc

    @classmethod
    def row(cls, key: str) -> Output:
        """The table row of the flat output `key` (`clean.0` is a row of `clean`)."""
        return cls.OUTPUTS[key.partition(".")[0]]


Encoded.OUTPUTS = {
    name: hint.__metadata__[0]
    for name, hint in get_type_hints(Encoded, include_extras=True).items()
    if isinstance(getattr(hint, "__metadata__", (None,))[0], Output)
}


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
        cnn = cfg.model.cnn_spec()
        if cnn is not None:
            return cls(cnn_width(cnn), 1, cfg.model.text_spec().width, vocab_size, cfg.model.head)
        vision = cfg.model.vision_spec()
        return cls(vision.embed_dim, vision.patch_size, cfg.model.text_spec().width, vocab_size, cfg.model.head)


class Objective(nn.Module):
    """Base class of every pre-training objective: a plug-in found through the registry.

    A subclass declares `key` (its section under `objectives.` in the config, a dataclass in
    `harmony.objective_config` that carries the section's own checks), `needs_for` (the views and passes it
    reads, from its section alone, so the data layer needs no modules), `build` when it owns modules sized
    from `ModelDims` (the default passes the section alone) and `forward(encoded, batch, step) -> LossOutput`
    (unweighted loss + metrics). It may own EMA'd heads (`ema_pairs`), per-step state (`after_step`), frozen
    parameters, and names its parts for the FLOP breakdown (`flop_parts`). Decorate it with `@register` to
    plug it in.
    """

    key: ClassVar[str] = ""
    # True when the loss couples the samples of a batch (a contrast over the batch, BatchNorm in a head): with
    # gradient accumulation it is computed once on the whole batch's cached tower outputs (GradCache), while a
    # per-sample loss runs inside each micro-batch
    batch_coupled: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg

    @classmethod
    def needs_for(cls, section: Any) -> Needs:
        """What this objective reads, given its config section."""
        raise NotImplementedError

    @classmethod
    def build(cls, section: Any, dims: ModelDims) -> Objective:
        """The objective and its modules for `section` (sized from `dims` where a subclass says how)."""
        return cls(section)

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
