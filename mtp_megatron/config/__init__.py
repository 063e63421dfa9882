"""Typed run configuration: schema (one dataclass per concern), YAML + override loading, validation."""

from mtp_megatron.config.errors import ConfigError
from mtp_megatron.config.loader import config_from_dict, config_to_dict, load_config, save_resolved_config
from mtp_megatron.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MTPConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TokenizerConfig,
    TrainConfig,
    describe_fields,
    format_config_help,
)
from mtp_megatron.config.validate import validate, validate_for_training

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "MTPConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TokenizerConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "format_config_help",
    "load_config",
    "save_resolved_config",
    "validate",
    "validate_for_training",
]
