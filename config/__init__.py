"""Typed run configuration loaded from `configs/*.yaml` plus dotted overrides."""
from config.load import ConfigError, dump_config, load_config
from config.schema import Config

__all__ = ["Config", "ConfigError", "dump_config", "load_config"]
