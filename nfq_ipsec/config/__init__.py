"""Configuration: the TOML file format, its validation, and the model the daemon runs on."""

from .loader import load_config, parse_config
from .model import Config, DaemonConfig, NodeConfig, QueueConfig

__all__ = ["Config", "DaemonConfig", "NodeConfig", "QueueConfig", "load_config", "parse_config"]
