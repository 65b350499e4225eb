"""Which exceptions are user mistakes: the CLI shows them as one clear message, without a
traceback (`embtables --debug ...` shows it anyway)."""

from __future__ import annotations


def is_user_error(e: BaseException) -> bool:
    # ValueError covers ConfigError, BadRowError, BudgetTooSmall, ShardingError/PlanDoesNotFit
    # and SearchInfeasible; a LaunchError is not here because its message is another rank's
    # traceback, which is the useful part.
    from embtables.experiments.trainer import TrainingDiverged
    from embtables.sharding.checkpoint import CheckpointError

    return isinstance(e, (ValueError, FileNotFoundError, KeyError, TrainingDiverged, CheckpointError))
