"""Exceptions more than one layer raises or catches, and which of them are user mistakes:
the CLI shows those as one clear message, without a traceback (`embtables --debug ...`
shows it anyway). A leaf: it imports nothing from embtables, so every layer may use it."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model it is loaded into."""


def is_user_error(e: BaseException) -> bool:
    # ValueError covers ConfigError, BadRowError, BudgetTooSmall, ShardingError/PlanDoesNotFit
    # and SearchInfeasible; a LaunchError is not here because its message is another rank's
    # traceback, which is the useful part.
    return isinstance(e, (ValueError, FileNotFoundError, KeyError, TrainingDiverged, CheckpointError))
