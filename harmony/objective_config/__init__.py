"""The `objectives:` block of the config: one optional section per registered objective, in the order the
objectives run. Torch-free, below `harmony.config`, so configs load without the models.

Adding an objective: its section (a dataclass deriving from `ObjectiveSection`) in a module of this package,
and a field here named by its config key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from harmony.objective_config.barlowtwins import BarlowTwinsConfig
from harmony.objective_config.filip import FILIPConfig
from harmony.objective_config.mocov2 import MoCoV2Config
from harmony.objective_config.section import DecoderConfig, HeadConfig, ObjectiveSection
from harmony.objective_config.sections import (
    BYOLConfig,
    ClipConfig,
    FLIPConfig,
    IBOTConfig,
    MAEConfig,
    MaskedDistillConfig,
    MLMConfig,
    MoCoV3Config,
    SigLIPConfig,
    SimCLRConfig,
    SimSiamConfig,
    TextDistillConfig,
)
from harmony.objective_config.swav import SwAVConfig
from harmony.objective_config.vicreg import VICRegConfig

__all__ = [
    "BYOLConfig",
    "BarlowTwinsConfig",
    "ClipConfig",
    "DecoderConfig",
    "FILIPConfig",
    "FLIPConfig",
    "HeadConfig",
    "IBOTConfig",
    "MAEConfig",
    "MLMConfig",
    "MaskedDistillConfig",
    "MoCoV2Config",
    "MoCoV3Config",
    "ObjectiveSection",
    "ObjectivesConfig",
    "SigLIPConfig",
    "SimCLRConfig",
    "SimSiamConfig",
    "SwAVConfig",
    "TextDistillConfig",
    "VICRegConfig",
]


@dataclass
class ObjectivesConfig:
    clip: ClipConfig | None = None
    ibot: IBOTConfig | None = None
    mae: MAEConfig | None = None
    mlm: MLMConfig | None = None
    text_distill: TextDistillConfig | None = None
    simclr: SimCLRConfig | None = None
    masked_distill: MaskedDistillConfig | None = None
    byol: BYOLConfig | None = None
    simsiam: SimSiamConfig | None = None
    mocov3: MoCoV3Config | None = None
    siglip: SigLIPConfig | None = None
    flip: FLIPConfig | None = None
    mocov2: MoCoV2Config | None = None
    barlowtwins: BarlowTwinsConfig | None = None
    vicreg: VICRegConfig | None = None
    swav: SwAVConfig | None = None
    filip: FILIPConfig | None = None

    def enabled(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def sections(self) -> dict[str, ObjectiveSection]:
        """{name: section} of the enabled objectives, in field order."""
        return {name: getattr(self, name) for name in self.enabled()}
