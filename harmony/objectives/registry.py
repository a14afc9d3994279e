"""The objective registry: every module in `harmony.objectives` that decorates an `Objective` with
`@register` is plugged in under its config key. The task and the data layer go through here, so adding a
method means one objective module (plus its config section and a preset), nothing in `train/` or `data/`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import harmony.objectives as package
from harmony.config import Config, ConfigError
from harmony.models.cnn import cnn_width
from harmony.models.tokenizer import CaptionTokenizer
from harmony.objectives.base import REGISTRY, ModelDims, Needs, Objective


def registry() -> dict[str, type[Objective]]:
    """{config key: objective class}, after importing every objective module once."""
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return REGISTRY


def enabled_sections(cfg: Config) -> list[tuple[type[Objective], Any]]:
    """(objective class, config section) of every enabled objective, in config field order."""
    plugins = registry()
    out = []
    for key in cfg.objectives.enabled():
        if key not in plugins:
            raise ValueError(f"objectives.{key} has no registered objective")
        out.append((plugins[key], getattr(cfg.objectives, key)))
    return out


def check_image_tower(cfg: Config) -> None:
    """Refuse, before any module is built, a CNN image tower that timm cannot build, or one with an objective that
    reads patch tokens (`Needs.reads_patch_tokens`: a CNN gives only its pooled feature)."""
    cnn = cfg.model.cnn_spec()
    if cnn is None:
        return
    try:
        cnn_width(cnn)
    except ValueError as exc:
        raise ConfigError(f"config key 'model.vision': {exc}") from None
    for cls, section in enabled_sections(cfg):
        if cls.needs_for(section).reads_patch_tokens:
            raise ConfigError(
                f"config key 'model.vision': objectives.{cls.key} needs patch tokens, which the CNN image tower "
                f"{cfg.model.vision} does not have (it gives one pooled feature per image); use a ViT size, or "
                f"switch it off with objectives.{cls.key}=null"
            )


def build_objectives(cfg: Config, vocab_size: int) -> dict[str, Objective]:
    """The enabled objectives (with their heads/decoders), sized from the config alone."""
    check_image_tower(cfg)
    dims = ModelDims.of(cfg, vocab_size)
    return {cls.key: cls.build(section, dims) for cls, section in enabled_sections(cfg)}


def needs_for_config(cfg: Config) -> Needs:
    """The union of the enabled objectives' needs, computed without building any module."""
    return Needs.union_of(cls.needs_for(section) for cls, section in enabled_sections(cfg))


def make_tokenizer(cfg: Config) -> CaptionTokenizer | None:
    """The caption tokenizer when an enabled objective reads captions, else None."""
    return CaptionTokenizer(cfg.model.context_length) if needs_for_config(cfg).needs_text else None
