"""Budget knobs of the evaluation protocols.

Each protocol has a settings dataclass whose field defaults are sized for the built-in data on a CPU
(minutes with a tiny model); a second instance holds the paper-sized values used for real datasets.
`resolve` picks the base from the data spec and applies the caller's overrides; `add_flags` turns the
fields into `--flag`s so the CLI and the Python API take the same knobs under the same names. The knobs several
protocols share (subset sizes, seed, the fine-tuning optimiser's decays) are declared once here, so each means
and reads the same everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import field, fields, replace
from typing import Any, TypeVar

from harmony.core.errors import ConfigError

S = TypeVar("S")


def setting(default: Any, help: str) -> Any:
    """A settings field: its default and the help text of its `--flag`."""
    return field(default=default, metadata={"help": help})


def max_train(default: int) -> Any:
    """`max_train`: the size of the fixed random subset of the training split a protocol uses."""
    return setting(default, "training images used (0 = all)")


def max_eval() -> Any:
    """`max_eval`: the size of the fixed random subset of the evaluation split (all by default)."""
    return setting(0, "evaluation images used (0 = all)")


def seed() -> Any:
    """`seed`: the protocol's one random seed."""
    return setting(0, "random seed (subsets, initialisation, shuffling)")


def layer_decay(default: float) -> Any:
    """`layer_decay`: a trained ViT's lr shrinks by this factor per layer below the head."""
    return setting(default, "lr x decay^(layers above)")


def weight_decay() -> Any:
    """`weight_decay` of the AdamW that trains a backbone with its head."""
    return setting(0.05, "AdamW weight decay")


def is_builtin(spec: str) -> bool:
    return spec.startswith("builtin:")


def resolve(defaults: S, full: S, data_spec: str, overrides: Mapping[str, Any]) -> S:
    """`defaults` for built-in data, `full` for anything else, then every non-None override."""
    names = {f.name for f in fields(defaults)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; known: {sorted(names)}")
    base = defaults if is_builtin(data_spec) else full
    given = {k: _coerce(getattr(base, k), v) for k, v in overrides.items()}
    return replace(base, **{k: v for k, v in given.items() if v is not None})  # type: ignore[type-var]


def _coerce(default: Any, value: Any) -> Any:
    """A sequence setting may be given as one value, a list or a comma-separated string."""
    if value is None or not isinstance(default, tuple):
        return value
    if isinstance(value, str):
        return parse_value(default, value)
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _scalar(kind: type, text: str) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"'{text}' is not a boolean")
        return text.lower() in ("true", "1", "yes")
    try:
        return kind(text.strip())
    except ValueError:
        raise ConfigError(f"cannot read '{text.strip()}' as {kind.__name__}") from None


def parse_value(default: Any, text: str) -> Any:
    """Text -> the type of a setting's default: for tuple settings a comma-separated list of one or
    more values (`5` -> (5,), `5,7` -> (5, 7)); a string setting keeps the text whole. ConfigError otherwise."""
    if isinstance(default, tuple):
        kind = type(default[0]) if default else str
        values = tuple(_scalar(kind, part) for part in text.split(",") if part.strip())
        if not values:
            raise ConfigError(f"'{text}' holds no value (give one or a comma-separated list)")
        return values
    return _scalar(type(default), text)


def _parser_for(default: Any) -> Callable[[str], Any]:
    """An argparse `type` whose error names the expected type ("invalid value" would not)."""

    def parse(text: str) -> Any:
        try:
            return parse_value(default, text)
        except ConfigError as exc:
            kind = type(default[0] if isinstance(default, tuple) and default else default).__name__
            what = f"{kind} list" if isinstance(default, tuple) else kind
            raise argparse.ArgumentTypeError(f"expected {what}: {exc}") from None

    return parse


def add_flags(parser: argparse.ArgumentParser, defaults: object, full: object) -> None:
    """One `--name` per settings field; the help shows both defaults (built-in data / real data)."""
    group = parser.add_argument_group("protocol settings (default: built-in data / real data)")
    for f in fields(defaults):  # type: ignore[arg-type]
        value, big = getattr(defaults, f.name), getattr(full, f.name)
        flag = "--" + f.name.replace("_", "-")
        shown = f"{value!r} / {big!r}" if value != big else f"{value!r}"
        help_text = f"{f.metadata.get('help', '')} [{shown}]".strip()
        if isinstance(value, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "A,B,..." if isinstance(value, tuple) else None
            group.add_argument(flag, type=_parser_for(value), default=None, metavar=metavar, help=help_text)


def overrides_from(args: argparse.Namespace, defaults: object) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(defaults) if getattr(args, f.name, None) is not None}  # type: ignore[arg-type]


def from_config(defaults: S, full: S, data_spec: str, given: Mapping[str, Any], key: str) -> S:
    """A protocol's settings from a config mapping (`eval.knn`: values as YAML or `key=value` text gives them),
    read as the `--flag`s read them; an unknown name or a value of the wrong type is a ConfigError naming the key."""
    names = [f.name for f in fields(defaults)]  # type: ignore[arg-type]
    overrides: dict[str, Any] = {}
    for name, value in given.items():
        if name not in names:
            raise ConfigError(f"unknown config key '{key}.{name}'; known: {', '.join(names)}")
        text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        try:
            overrides[name] = parse_value(getattr(defaults, name), text)
        except ConfigError as exc:
            raise ConfigError(f"config key '{key}.{name}': {exc}") from None
    return resolve(defaults, full, data_spec, overrides)
