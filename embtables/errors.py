"""Which exceptions are user mistakes (shown as one clear message, no traceback)."""

from __future__ import annotations


class EmbtablesError(Exception):
    """Base for errors whose message is the whole story."""


def is_user_error(e: BaseException) -> bool:
    from embtables.experiments.config import ConfigError
    from embtables.experiments.trainer import TrainingDiverged

    return isinstance(e, (EmbtablesError, ConfigError, TrainingDiverged, FileNotFoundError, ValueError, KeyError))
