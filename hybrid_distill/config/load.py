"""Building a config: preset, then YAML file, then dotted overrides; saving and reloading it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hybrid_distill.config import presets
from hybrid_distill.config.parse import apply_dict, parse_override, set_key, to_dict
from hybrid_distill.config.schema import Config, validate
from hybrid_distill.errors import ConfigError


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(preset: str | None = "tiny", config_file: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated config: preset, then YAML file, then dotted overrides (later wins).

    Args:
        preset: name of a function in ``hybrid_distill.config.presets`` (None: the dataclass defaults).
        config_file: YAML file with nested sections; may name a ``preset:`` of its own at top level.
        overrides: ``section.key=value`` strings, type-checked against the dataclass fields.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        preset = values.pop("preset", preset)
    cfg = presets.get_preset(preset) if preset else Config()
    apply_dict(cfg, values)
    for text in overrides:
        set_key(cfg, *parse_override(text))
    return validate(cfg)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved with ``to_dict`` (e.g. from a checkpoint's client state)."""
    cfg = Config()
    apply_dict(cfg, values)
    return validate(cfg)
