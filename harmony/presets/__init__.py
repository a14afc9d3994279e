"""The presets shipped in this folder and how they compose.

A preset `{method}-{size}` is the merge of `sizes/{size}.yaml` (model, data and training budget) and
`methods/{method}.yaml` (which objectives, and anything the method changes), so every method of one
size shares exactly the same model and budget. `suites/` holds the reproduction suites.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from harmony.config import Config, ConfigError, set_override, upgrade_keys, validate
from harmony.typed import from_dict, merge

_PRESETS = resources.files("harmony") / "presets"


def _yaml(path: Any) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path} is not a mapping")
    return data


def _names(kind: str) -> list[str]:
    folder = _PRESETS / kind
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def method_names() -> list[str]:
    return _names("methods")


def size_names() -> list[str]:
    return _names("sizes")


def preset_names() -> list[str]:
    return [f"{m}-{s}" for m in method_names() for s in size_names()]


def describe(kind: str, name: str) -> str:
    """The `description` line of a method or size file."""
    return str(_yaml(_PRESETS / kind / f"{name}.yaml").get("description", ""))


def split_preset(name: str) -> tuple[str, str]:
    for size in sorted(size_names(), key=len, reverse=True):
        if name.endswith("-" + size):
            method = name[: -len(size) - 1]
            if method in method_names():
                return method, size
    close = difflib.get_close_matches(name, preset_names(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(
        f"unknown preset '{name}': {hint}presets are '{{method}}-{{size}}' with method in "
        f"{', '.join(method_names())} and size in {', '.join(size_names())} (see `harmony presets`)"
    )


def _strip(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "description"}


def compose(size: dict[str, Any], method: dict[str, Any], method_name: str = "") -> dict[str, Any]:
    """Merge a size file and a method file. The method decides which objectives are on; the size
    file's `objectives` entries are size-dependent defaults (decoder widths, head sizes) applied only
    to objectives the method enables, and the method's own values win. A size file's `methods.<name>` entry
    is what that method uses at that size in place of the size's own settings (ALIGN's CNN and text towers),
    and wins over both."""
    size = _strip(size)
    size_objectives = size.pop("objectives", {}) or {}
    own = (size.pop("methods", {}) or {}).get(method_name, {})
    data = merge(merge(size, _strip(method)), own)
    enabled = data.get("objectives") or {}
    for name, defaults in size_objectives.items():
        if enabled.get(name) is not None:
            enabled[name] = merge(defaults, enabled[name] if isinstance(enabled[name], dict) else {})
    return data


def load_preset(name: str) -> Config:
    """A preset by name (`harmony-tiny`) or a YAML file holding a full or partial config."""
    path = Path(name)
    if name.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise ConfigError(f"config file '{name}' does not exist")
        try:
            data = _yaml(path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{name}' is not valid YAML: {str(exc).splitlines()[0]}") from None
        return from_dict(Config, upgrade_keys(_strip(data)))
    method, size = split_preset(name)
    data = compose(_yaml(_PRESETS / "sizes" / f"{size}.yaml"), _yaml(_PRESETS / "methods" / f"{method}.yaml"), method)
    data["name"] = name
    return from_dict(Config, data)


def build_config(preset: str, overrides: list[str] | None = None) -> Config:
    cfg = load_preset(preset)
    for assignment in overrides or []:
        cfg = set_override(cfg, assignment)
    validate(cfg)
    return cfg
