"""Typed run configuration: the generic recipe loader (`loader`) and the sections every stage shares (`sections`).

    from vibeperf.config import load_config
    from vibeperf.sft.config import SFTConfig
    cfg = load_config(SFTConfig, "recipes/sft_tiny.toml", ["optim.lr=1e-5", "stages.1.epochs=2"])

Stage-specific sections live in the stage's package: `vibeperf.sft.config`, `vibeperf.rl.config`,
`vibeperf.eval.config`, `vibeperf.distill.config`, `vibeperf.clr.config`.
"""

from vibeperf.config.loader import (
    ConfigError,
    apply_overrides,
    check,
    config_from_dict,
    config_to_dict,
    describe_config,
    field_docs,
    load_config,
    parse_override_value,
    read_config_file,
    run_recipe_command,
)
from vibeperf.config.sections import (
    DEVICE_PATTERN,
    Attention,
    CheckpointConfig,
    DataFile,
    EngineConfig,
    LoggingConfig,
    LossBackend,
    ModelConfig,
    OptimConfig,
    Precision,
    RewardConfig,
    SamplingConfig,
    check_device_name,
)

__all__ = [
    "DEVICE_PATTERN",
    "Attention",
    "CheckpointConfig",
    "ConfigError",
    "DataFile",
    "EngineConfig",
    "LoggingConfig",
    "LossBackend",
    "ModelConfig",
    "OptimConfig",
    "Precision",
    "RewardConfig",
    "SamplingConfig",
    "apply_overrides",
    "check",
    "check_device_name",
    "config_from_dict",
    "config_to_dict",
    "describe_config",
    "field_docs",
    "load_config",
    "parse_override_value",
    "read_config_file",
    "run_recipe_command",
]
