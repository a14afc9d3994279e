"""Objectives are plug-ins: the registry, not `train/`, `data/` or `config.validate`, knows them."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import harmony.config as config_module
from harmony.config import ConfigError, ObjectivesConfig
from harmony.objectives.base import Needs
from harmony.objectives.registry import build_objectives, needs_for_config, registry
from harmony.presets import build_config, method_names

ROOT = Path(__file__).resolve().parents[1] / "harmony"


def test_every_config_section_has_its_registered_objective() -> None:
    plugins = registry()
    fields = {f.name: f for f in dataclasses.fields(ObjectivesConfig)}
    assert set(plugins) == set(fields)
    for key, cls in plugins.items():
        assert cls.key == key


@pytest.mark.parametrize("method", method_names())
def test_needs_from_config_equal_needs_of_built_objectives(method: str) -> None:
    """The data layer reads needs from the config alone; they must be what the built objectives say."""
    cfg = build_config(f"{method}-tiny-test")
    built = build_objectives(cfg, vocab_size=64)
    assert needs_for_config(cfg) == Needs.union_of(objective.needs() for objective in built.values())


def test_ibot_mask_recipe_reaches_the_views_through_needs() -> None:
    cfg = build_config("ibot-tiny-test", ["objectives.ibot.mask_ratio_max=0.4"])
    recipe = needs_for_config(cfg).block_masks
    assert recipe is not None and recipe.ratio_max == 0.4
    assert needs_for_config(build_config("dino-tiny-test")).block_masks is None  # DINO: no patch loss, no masks
    assert needs_for_config(build_config("ibot-tiny-test")).num_global == 2
    assert needs_for_config(build_config("clip-tiny-test")).num_global == 1


def _string_constants(tree: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _attributes(tree: ast.AST) -> set[str]:
    """Names read as `<...>.objectives.<name>`."""
    return {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "objectives"
    }


def test_no_objective_names_in_train_data_or_validation() -> None:
    names = set(registry())
    for folder in ("train", "data"):
        for path in (ROOT / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            found = names & (_string_constants(tree) | _attributes(tree))
            assert not found, f"{path.relative_to(ROOT)} names objectives {sorted(found)}"
    tree = ast.parse(inspect.getsource(config_module.validate))
    assert not names & (_string_constants(tree) | _attributes(tree))


def test_section_checks_are_run_by_validate() -> None:
    cases = {
        "objectives.text_distill.mask_prob=0.3": "objectives.mlm.mask_prob' and 'objectives.text_distill.mask_prob",
        "objectives.ibot.mask_ratio_min=0.6": "'objectives.ibot.mask_ratio_min/max' need",
        "objectives.mae.mask_ratio=1.5": "'objectives.mae.mask_ratio' must be a probability",
        "objectives.clip=null": "'objectives.mlm' needs 'objectives.clip', which trains the text tower",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_config("harmony-tiny-test", [override])


def test_section_sizes_must_be_positive() -> None:
    """A zero-width projector or a zero temperature used to fail mid-step (a traceback or non-finite loss)."""
    with pytest.raises(ConfigError, match=r"'objectives.byol.hidden_dim' must be positive, got 0"):
        build_config("byol-tiny-test", ["objectives.byol.hidden_dim=0"])
    with pytest.raises(ConfigError, match=r"'objectives.simclr.temperature' must be positive"):
        build_config("slip-tiny-test", ["objectives.simclr.temperature=0"])


@pytest.mark.parametrize("ratio", ["0", "1"])
def test_mae_mask_ratio_must_leave_patches_to_see_and_to_predict(ratio: str) -> None:
    """Ratio 0 trained to a NaN loss (nothing removed), 1 leaves the encoder no input."""
    with pytest.raises(ConfigError, match=r"'objectives.mae.mask_ratio' must be between 0 and 1"):
        build_config("mae-tiny-test", [f"objectives.mae.mask_ratio={ratio}"])
