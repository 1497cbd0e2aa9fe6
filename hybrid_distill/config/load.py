"""Building a config: preset, then YAML file, then dotted overrides; saving and reloading it."""

from __future__ import annotations

import re
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
                overrides: list[str] | tuple[str, ...] = (), fallback_preset: str | None = None) -> Config:
    """Build a validated config: preset, then YAML file, then dotted overrides (later wins).

    Args:
        preset: name of a function in ``hybrid_distill.config.presets`` (None: the YAML's ``preset:``, else
            ``fallback_preset``, else the dataclass defaults).
        config_file: YAML file with nested sections; may name a ``preset:`` of its own at top level, which must
            then agree with ``preset``.
        overrides: ``section.key=value`` strings, type-checked against the dataclass fields; each key at most once.
        fallback_preset: the preset used when neither ``preset`` nor the YAML names one.

    Raises:
        ConfigError: a key given twice (in the overrides or in one YAML mapping), a YAML ``preset:`` that
            contradicts ``preset``, malformed YAML, or any invalid key or value.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values = read_yaml(config_file)
        preset = _agreed_preset(preset, values.pop("preset", None), config_file)
    parsed = [parse_override(text) for text in overrides]
    check_unique_keys(parsed)
    name = preset or fallback_preset
    cfg = presets.get_preset(name) if name else Config()
    apply_dict(cfg, values)
    for key, value in parsed:
        set_key(cfg, key, value)
    return validate(cfg)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}:{key_node.start_mark.line + 1}: key {key!r} is given "
                                  f"twice in one mapping (first on line {seen[key] + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(config_file: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (safe loader, no key twice).

    Raises:
        ConfigError: missing file, malformed YAML (file, line and column named), or not a mapping.
    """
    path = Path(config_file)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"--config {str(path)!r} {what}: pass a YAML file of config sections")
    try:
        with path.open(encoding="utf-8") as f:
            values = yaml.load(f, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: config file is not valid YAML ({problem}); fix the file") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return values


def _agreed_preset(cli: str | None, from_file: Any, config_file: str | Path) -> str | None:
    """The preset when the command line and the YAML file name at most one (or the same) preset."""
    if from_file is not None and cli is not None and from_file != cli:
        raise ConfigError(f"--preset {cli} contradicts 'preset: {from_file}' in {config_file}: name the preset in one "
                          "place (drop --preset, or the file's preset: line)")
    return cli if cli is not None else from_file


def check_unique_keys(parsed: list[tuple[str, str]], source: str = "the command line") -> None:
    """Refuse a dotted key given more than once: last-wins would silently drop the others.

    An unquoted brace pattern (``data.source=wds:/d/shard-{0000..2047}.tar``) is expanded by the shell into one
    override per shard; the error says to quote it.
    """
    values: dict[str, list[str]] = {}
    for key, value in parsed:
        values.setdefault(key, []).append(value)
    for key, given in values.items():
        if len(given) < 2:
            continue
        shown = ", ".join(f"{key}={v}" for v in given[:3]) + (f", ... ({len(given)} in all)" if len(given) > 3 else "")
        hint = "give it once"
        patterns = {re.sub(r"\d+", "#", v) for v in given}
        if len(patterns) == 1 and re.search(r"[/_:]|[A-DF-Za-df-z]", next(iter(patterns))):
            hint = (f"this looks like a shell-expanded brace pattern: quote it so the trainer gets it whole, e.g. "
                    f"'{key}={_brace_hint(given)}'")
        raise ConfigError(f"config key {key} is given {len(given)} times on {source} ({shown}); {hint}")


def _brace_hint(values: list[str]) -> str:
    """``shard-0000.tar ... shard-2047.tar`` -> ``shard-{0000..2047}.tar`` (the first differing number)."""
    first, last = values[0], values[-1]
    for a, b in zip(re.finditer(r"\d+", first), re.finditer(r"\d+", last), strict=False):
        if a.group() != b.group():
            return f"{first[:a.start()]}{{{a.group()}..{b.group()}}}{first[a.end():]}"
    return first


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved with ``to_dict`` (e.g. from a checkpoint's client state)."""
    cfg = Config()
    apply_dict(cfg, values)
    return validate(cfg)
