"""The `methods-tiny` suite compares every method of the built-in comparison from one code path."""

from __future__ import annotations

from harmony.presets import build_config, method_names
from harmony.repro.suite import load_suite


def test_methods_suite_holds_every_method_and_each_builds_at_its_size() -> None:
    suite = load_suite("methods-tiny")
    methods = {m for m in method_names() if "+" not in m}  # the Table 4 ablations are the other suites' rows
    assert set(suite.methods) == methods
    for preset in suite.presets(with_ablations=False):
        cfg = build_config(preset, suite.train.overrides)
        towers = "timm:resnet-tiny" if preset.startswith("align-") else "tiny"  # ALIGN's own towers (sizes/tiny.yaml)
        assert cfg.model.vision == towers and cfg.train.epochs == 2, preset
