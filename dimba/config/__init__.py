"""The one DIMBA config system (typed sections, JSON on disk, `--set` overrides)."""
from dimba.config.core import ConfigError
from dimba.config.schema import (CleanMaskConfig, Config, DataConfig, DiffusionConfig, EvaluationConfig,
                                 LoggingConfig, MaskedConfig, ModelConfig, SamplingConfig, TrainingConfig, config_from_dict,
                                 load_config, save_config)

__all__ = ["ConfigError", "CleanMaskConfig", "Config", "DataConfig", "DiffusionConfig", "EvaluationConfig",
           "LoggingConfig", "MaskedConfig", "ModelConfig", "SamplingConfig", "TrainingConfig", "config_from_dict", "load_config",
           "save_config"]
