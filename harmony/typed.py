"""Typed dataclasses from plain data (YAML, `key=value`): every mistake is a one-line error naming the key."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from harmony.core.errors import ConfigError

NONE_WORDS = {"null", "none", "~", "off"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or the command line) to the annotated type `tp`, or raise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        entries: Any = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(entries, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(entries)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return {
            str(k): _coerce(v if v is not None or item is Any else {}, item, f"{key}.{k}") for k, v in value.items()
        }
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if value is None:
            raise ConfigError(f"config key '{key}' cannot be null")
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, prefix=key)  # type: ignore[arg-type]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is None and "none" in choices:  # `key=none` reads as null; here it is the choice of that name
            return "none"
        if value not in choices:
            raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        members = typing.get_args(tp)
        items: Any = [v for v in value.strip("[]() ").split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != len(members):
            raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, members)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on"}:
            return True
        if isinstance(value, str) and value.lower() in {"false", "no", "0", "off"}:
            return False
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        number: float | None = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        if not math.isfinite(number):  # nan/inf would train without a word and produce nothing usable
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}")  # pragma: no cover


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly partial) mapping; unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain nested dict (tuples as lists) for YAML and checkpoints."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `None` in `update` replaces (used to switch an objective off)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` lines for every leaf that differs between two nested dicts."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def known_only(cls: type, data: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """Drop keys `cls` does not declare (settings a newer or older version wrote), recursively;
    returns (kept data, dropped dotted keys). Used for configs stored in checkpoints."""
    hints = typing.get_type_hints(cls)
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            dropped.append(path)
            continue
        target = hints[key]
        options = (
            [a for a in typing.get_args(target) if a is not type(None)]
            if typing.get_origin(target) in (Union, types.UnionType)
            else [target]
        )
        inner = next((a for a in options if dataclasses.is_dataclass(a)), None)
        if inner is not None and isinstance(value, dict):
            value, more = known_only(inner, value, path)  # type: ignore[arg-type]
            dropped += more
        kept[key] = value
    return kept, dropped
