"""Experiments: YAML schema, runner, sweeps, reports, CLI."""

from embtables.experiments.config import ConfigError, ExperimentConfig, load_config


def run(*args, **kwargs):
    """``run(config, overrides=None, run_dir=None, resume=None) -> summary`` (see runner.run)."""
    from embtables.experiments.runner import run as _run

    return _run(*args, **kwargs)


__all__ = ["ConfigError", "ExperimentConfig", "load_config", "run"]
