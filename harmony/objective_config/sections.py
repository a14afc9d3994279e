"""The config sections of the objectives that shipped together (CLIP, iBOT/DINO, MAE, MLM, text and masked
distillation, SimCLR, BYOL, SimSiam, MoCo v3, SigLIP, FLIP): one dataclass per registered objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from harmony.objective_config.section import (
    DROPPED_CROPS,
    DecoderConfig,
    HeadConfig,
    ObjectiveSection,
    one_logit_scale,
)
from harmony.typed import ConfigError


@dataclass
class ClipConfig(ObjectiveSection):
    """Image-text contrast. `alpha` weighs hard targets: L = a*L_hard + (1-a)*L_soft."""

    min_batch: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its contrast needs a negative pair (another caption or image of the batch)"

    weight: float = 1.0
    soft_targets: bool = False
    alpha_start: float = 1.0
    alpha_end: float = 0.2
    alpha_epochs: float = 10.0
    soft_temperature: float = 0.1
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0

    def shared(self) -> dict[str, tuple[str, object]]:
        return one_logit_scale(self.logit_scale_init, self.logit_scale_max)


class SelfDistillationSection(ObjectiveSection):
    """The temperature keys every self-distillation section spells alike: `student_temp`, and the teacher
    temperature warmed up linearly `teacher_temp_start` -> `teacher_temp_end` over `teacher_temp_warmup_epochs`."""

    student_temp: float
    teacher_temp_start: float
    teacher_temp_end: float
    teacher_temp_warmup_epochs: float

    def positives(self) -> dict[str, float]:
        return {
            "student_temp": self.student_temp,
            "teacher_temp_start": self.teacher_temp_start,
            "teacher_temp_end": self.teacher_temp_end,
        }


@dataclass
class IBOTConfig(SelfDistillationSection):
    """iBOT self-distillation (CLS over all cross-view pairs + masked patch tokens); DINO without patches."""

    weight: float = 1.0
    patch_loss: bool = True
    local_crops: int = 8
    student_temp: float = 0.1
    teacher_temp_cls: float = 0.04
    # the patch tokens' teacher temperature, warmed up start -> end (the spelling of every self-distillation)
    teacher_temp_start: float = 0.04
    teacher_temp_end: float = 0.07
    teacher_temp_warmup_epochs: float = 10.0
    center_momentum: float = 0.9
    mask_probability: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    mask_min_patches: int = 16
    mask_aspect_min: float = 0.3
    freeze_last_layer_epochs: float = 1.0
    # the lecture's ablations: `student` makes the teacher the student's current weights (no momentum teacher: its
    # targets are the student's own outputs on the clean global crops, without gradient); `mse` puts the squared
    # distance between the teacher's and the student's distributions in place of the cross-entropy; `predictor`
    # adds an MLP on the student side, between the head's MLP and its last layer
    teacher: Literal["ema", "student"] = "ema"
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    predictor: bool = False

    def probabilities(self) -> dict[str, float]:
        return {"mask_probability": self.mask_probability}

    def check(self, key: str) -> None:
        if not 0 <= self.mask_ratio_min <= self.mask_ratio_max < 1:
            raise ConfigError(f"config keys '{key}.mask_ratio_min/max' need 0 <= min <= max < 1")


@dataclass
class MAEConfig(ObjectiveSection):
    """MAE pixel reconstruction on every global crop; loss over removed patches, normalised targets."""

    weight: float = 1.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(depth=8, width=512, heads=16))

    def probabilities(self) -> dict[str, float]:
        return {"mask_ratio": self.mask_ratio}

    def shared(self) -> dict[str, tuple[str, object]]:
        return {DROPPED_CROPS: ("mask_ratio", 1.0 - self.mask_ratio)}

    def check(self, key: str) -> None:  # 0 removes nothing (a loss over no patch is NaN), 1 leaves no input
        if self.mask_ratio in (0.0, 1.0):  # outside [0, 1] is the probability check's
            raise ConfigError(
                f"config key '{key}.mask_ratio' must be between 0 and 1 (exclusive), got {self.mask_ratio}"
            )


@dataclass
class MaskedCaptionSection(ObjectiveSection):
    """The settings of the sections that read the masked caption (MLM, text self-distillation): each word is
    replaced by [MASK] with probability `mask_prob`, one draw for both, so they must agree on it; the text tower
    they train is CLIP's."""

    weight: float = 1.0
    mask_prob: float = 0.2

    requires: ClassVar[dict[str, str]] = {"clip": "which trains the text tower"}

    def probabilities(self) -> dict[str, float]:
        return {"mask_prob": self.mask_prob}

    def shared(self) -> dict[str, tuple[str, object]]:
        return {"the same masked caption": ("mask_prob", self.mask_prob)}


@dataclass
class MLMConfig(MaskedCaptionSection):
    """Masked language modelling: the masked caption's words decoded to the vocabulary."""

    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(depth=4, width=512, heads=8))


@dataclass
class TextDistillConfig(MaskedCaptionSection, SelfDistillationSection):
    """Per-token self-distillation: text teacher on the clean caption, student on the masked one."""

    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp_end: float = 0.07
    teacher_temp_warmup_epochs: float = 10.0
    center_momentum: float = 0.9
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class SimCLRConfig(ObjectiveSection):
    """SimCLR's image-image contrast between the two global crops (MLP projection of `num_layers` linear layers,
    NT-Xent); the defaults are SLIP's."""

    min_batch: ClassVar[int] = 2
    min_batch_per_process: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its contrast needs negatives and its projector normalises each process's batch"

    weight: float = 1.0
    temperature: float = 0.1
    hidden_dim: int = 4096
    out_dim: int = 256
    num_layers: int = 3

    def positives(self) -> dict[str, float]:
        return {
            "hidden_dim": self.hidden_dim,
            "out_dim": self.out_dim,
            "temperature": self.temperature,
            "num_layers": self.num_layers,
        }


@dataclass
class MaskedDistillConfig(SelfDistillationSection):
    """MaskCLIP's masked self-distillation: student sees `keep_ratio` of the patches, a small decoder
    predicts the teacher's head output for the removed ones."""

    weight: float = 0.05
    keep_ratio: float = 0.25
    decoder_depth: int = 1
    decoder_heads: int = 16
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04  # constant by default (no warm-up): docs/fidelity.md
    teacher_temp_end: float = 0.04
    teacher_temp_warmup_epochs: float = 0.0
    center_momentum: float = 0.9

    def probabilities(self) -> dict[str, float]:
        return {"keep_ratio": self.keep_ratio}

    def shared(self) -> dict[str, tuple[str, object]]:
        return {DROPPED_CROPS: ("keep_ratio", self.keep_ratio)}


# the groups of GroupNorm in BYOL's heads with `norm: gn_ws`
BYOL_GROUPS = 16


@dataclass
class BYOLConfig(ObjectiveSection):
    """BYOL between the two global crops: online projector + predictor (MLPs), EMA target, 2 - 2 cos."""

    min_batch_per_process: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its projector and predictor normalise each process's batch (BatchNorm)"

    weight: float = 1.0
    hidden_dim: int = 4096
    out_dim: int = 256
    # the heads' normalisation: BatchNorm (the paper's), none, or GroupNorm over BYOL_GROUPS groups after
    # weight-standardised linear layers (the lecture's ablations)
    norm: Literal["bn", "none", "gn_ws"] = "bn"

    def positives(self) -> dict[str, float]:
        return {"hidden_dim": self.hidden_dim, "out_dim": self.out_dim}

    def check(self, key: str) -> None:
        if self.norm == "gn_ws" and self.hidden_dim % BYOL_GROUPS:
            raise ConfigError(
                f"config key '{key}.hidden_dim' must be a multiple of {BYOL_GROUPS} with norm gn_ws "
                f"(GroupNorm's {BYOL_GROUPS} groups), got {self.hidden_dim}"
            )


@dataclass
class SimSiamConfig(ObjectiveSection):
    """SimSiam between the two global crops: projector + bottleneck predictor, stop-gradient, no EMA, -cos."""

    min_batch: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its heads normalise over the batch (BatchNorm)"

    weight: float = 1.0
    hidden_dim: int = 2048
    out_dim: int = 2048
    predictor_hidden_dim: int = 512

    def positives(self) -> dict[str, float]:
        return {
            "hidden_dim": self.hidden_dim,
            "out_dim": self.out_dim,
            "predictor_hidden_dim": self.predictor_hidden_dim,
        }


@dataclass
class MoCoV3Config(ObjectiveSection):
    """MoCo v3 between the two global crops: queries (projector + predictor) against the EMA keys of the other
    crop over the global batch, InfoNCE at `temperature`. `hidden_dim` sizes the projector and the predictor."""

    min_batch: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its contrast needs negatives and its heads normalise over the batch"

    weight: float = 1.0
    temperature: float = 0.2
    hidden_dim: int = 4096
    out_dim: int = 256

    def positives(self) -> dict[str, float]:
        return {"hidden_dim": self.hidden_dim, "out_dim": self.out_dim, "temperature": self.temperature}


@dataclass
class SigLIPConfig(ObjectiveSection):
    """SigLIP's sigmoid loss on every image-caption pair of the global batch: learnable scale t and bias b."""

    min_batch: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its sigmoid loss needs negative pairs (the other captions of the batch)"

    weight: float = 1.0
    logit_scale_init: float = 10.0
    logit_scale_max: float = 100.0
    logit_bias_init: float = -10.0

    def positives(self) -> dict[str, float]:
        return {"logit_scale_init": self.logit_scale_init, "logit_scale_max": self.logit_scale_max}

    def shared(self) -> dict[str, tuple[str, object]]:
        return one_logit_scale(self.logit_scale_init, self.logit_scale_max)


@dataclass
class FLIPConfig(ObjectiveSection):
    """FLIP: CLIP (hard targets) with a random `mask_ratio` of the image patches dropped in training."""

    min_batch: ClassVar[int] = 2
    min_batch_reason: ClassVar[str] = "its contrast needs a negative pair (another caption or image of the batch)"

    weight: float = 1.0
    mask_ratio: float = 0.5
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0

    excludes: ClassVar[dict[str, str]] = {
        "clip": "both would read the one image embedding, FLIP's from the patch-dropped image, CLIP's from the full one",
        "siglip": "both would read the one image embedding, FLIP's from the patch-dropped image, SigLIP's from the "
        "full one",
    }

    def positives(self) -> dict[str, float]:
        return {"logit_scale_init": self.logit_scale_init, "logit_scale_max": self.logit_scale_max}

    def shared(self) -> dict[str, tuple[str, object]]:
        return {DROPPED_CROPS: ("mask_ratio", 1.0 - self.mask_ratio)} | one_logit_scale(
            self.logit_scale_init, self.logit_scale_max
        )

    def check(self, key: str) -> None:
        if not 0.0 < self.mask_ratio < 1.0:  # 0 is CLIP, 1 leaves the image tower no patch
            raise ConfigError(
                f"config key '{key}.mask_ratio' must be between 0 and 1 (exclusive), got {self.mask_ratio}"
            )
