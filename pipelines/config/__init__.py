"""Typed run configuration loaded from `configs/*.yaml` plus dotted overrides."""
from pipelines.config.load import ConfigError, dump_config, load_config
from pipelines.config.schema import Config

__all__ = ["Config", "ConfigError", "dump_config", "load_config"]
