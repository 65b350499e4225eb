"""Experiments: YAML schema, runner, sweeps, reports."""

from embtables.experiments.config import ConfigError, ExperimentConfig, load_config
from embtables.experiments.runner import run

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "run"]
