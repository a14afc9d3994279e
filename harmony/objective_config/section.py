"""What every objective's config section builds on: `ObjectiveSection` (the checks `validate` runs without
knowing any objective by name) and the head/decoder shapes sections share. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class HeadConfig:
    """DINO/iBOT projection head: MLP (hidden) -> bottleneck -> L2 norm -> weight-normed linear."""

    out_dim: int = 8192
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3


@dataclass
class DecoderConfig:
    depth: int = 8
    width: int = 512
    heads: int = 16


# what the objectives that read the patch-dropped crops share: one pass, so one kept fraction of the patches
DROPPED_CROPS = "the same patch-dropped crops (one keep ratio = 1 - mask_ratio)"


def one_logit_scale(init: float, cap: float) -> dict[str, tuple[str, object]]:
    """`shared` entries of the sections that set the model's one learnable logit scale (its init and cap)."""
    what = "the model's one learnable logit scale"
    return {f"{what} (its init)": ("logit_scale_init", init), f"{what} (its cap)": ("logit_scale_max", cap)}


# An objective is switched off by leaving it out (`objectives.mae=null`). Each section is the config
# of one registered objective (`harmony.objectives`) and carries its own checks.


class ObjectiveSection:
    """What every objective section declares for `validate`, which knows no objective by name.

    `requires` / `excludes`: {other section: why} that must / must not be enabled with this one; `probabilities` /
    `positives`: sub-keys whose values must lie in [0, 1] / be > 0; `shared`: {what: (sub-key, value)} that every
    section naming the same `what` must agree on (e.g. two objectives reading one masked caption); `check`: anything
    else."""

    requires: ClassVar[dict[str, str]] = {}
    excludes: ClassVar[dict[str, str]] = {}
    # the smallest batch the loss means something at: in the global batch (a contrast needs a negative) and
    # per process (a head with per-process BatchNorm needs two rows), with the reason said when it is not met
    min_batch: ClassVar[int] = 1
    min_batch_per_process: ClassVar[int] = 1
    min_batch_reason: ClassVar[str] = ""

    def probabilities(self) -> dict[str, float]:
        return {}

    def positives(self) -> dict[str, float]:
        """Sub-keys whose values must be > 0 (sizes of heads and projectors)."""
        return {}

    def shared(self) -> dict[str, tuple[str, object]]:
        return {}

    def check(self, key: str) -> None:
        """Raise `ConfigError` naming `key` (the section's dotted key) when the section is inconsistent."""
