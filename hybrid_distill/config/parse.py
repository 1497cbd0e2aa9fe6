"""Dotted keys, typed coercion of CLI/YAML values onto the config dataclasses, and plain-dict round trips."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

import yaml

from hybrid_distill.config.schema import Config, get_key
from hybrid_distill.errors import ConfigError


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two ``to_dict`` configs (one may come back from JSON: tuples and
    lists compare equal)."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(section)
    return out


def dotted_value(tree: dict, key: str) -> Any:
    """Value at a dotted key of a ``to_dict`` config (None where absent); ``get_key`` for the dataclasses."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def set_key(cfg: Any, key: str, value: Any) -> None:
    """Set a dotted key, converting ``value`` (str from the CLI or a YAML scalar) to the field's type."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(node)}
        if part not in names:
            where = ".".join(parts[:i]) or "config"
            raise ConfigError(f"unknown config key {key!r}: {where} has no field {part!r}; "
                              f"valid: {', '.join(sorted(names))}")
        if i == len(parts) - 1:
            hint = typing.get_type_hints(type(node))[part]
            setattr(node, part, _coerce(value, hint, key))
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``hint``; raise ``ConfigError`` naming ``key`` if impossible."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be None")
    if isinstance(value, str) and origin in (tuple, list):
        value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} expects {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        return origin(_coerce(v, item, key) for v in value)
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} expects a bool (true/false), got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects {hint.__name__}, got bool {value!r}")
        try:
            number = float(value) if hint is float else _to_int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects {hint.__name__}, got {value!r}") from None
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint}")


def _to_int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, str):
        as_float = float(value)
        if not as_float.is_integer():
            raise ValueError(value)
        return int(as_float) if any(c in value for c in ".eE") else int(value)
    return int(value)


def apply_dict(cfg: Config, values: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested mapping (from YAML) onto ``cfg``, with the same typing rules as overrides."""
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            node = get_key(cfg, key) if _is_section(cfg, key) else None
            if node is None:
                set_key(cfg, key, value)  # raises: unknown key or not a section
            apply_dict(cfg, value, prefix=f"{key}.")
        else:
            set_key(cfg, key, value)


def _is_section(cfg: Config, key: str) -> bool:
    try:
        return dataclasses.is_dataclass(get_key(cfg, key))
    except AttributeError:
        return False


def parse_override(text: str) -> tuple[str, str]:
    """Split ``"optim.base_lr=3e-4"`` into key and raw value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.base_lr=3e-4)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


