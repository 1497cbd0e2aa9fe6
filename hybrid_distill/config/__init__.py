"""The run configuration: typed dataclasses (``schema``), presets, and loading from YAML and dotted overrides.

``load_config`` is the one entry point::

    cfg = load_config(preset="tiny", config_file=None, overrides=["optim.base_lr=3e-4"])

Sources, later wins: a preset (``presets``), a YAML file, dotted overrides, each value type-checked against its
field (``parse``) and the result range-checked (``schema.validate``).
"""

from hybrid_distill.config.load import config_from_dict, load_config, save_config
from hybrid_distill.config.parse import apply_dict, changed_keys, dotted_value, parse_override, set_key, to_dict
from hybrid_distill.config.schema import (
    CHOICES,
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    MaskingConfig,
    OptimConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    get_key,
    peak_lr,
    validate,
)
from hybrid_distill.errors import ConfigError

__all__ = [
    "CHOICES", "Config", "ConfigError", "DataConfig", "EvalConfig", "LossConfig", "MaskingConfig", "OptimConfig",
    "RunConfig", "StudentConfig", "TeacherConfig", "apply_dict", "changed_keys", "config_from_dict", "dotted_value",
    "get_key", "load_config", "parse_override", "peak_lr", "save_config", "set_key", "to_dict", "validate",
]
