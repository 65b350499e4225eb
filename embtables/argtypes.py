"""argparse ``type=`` checks for numeric flags: a bad value becomes argparse's own one-line
error naming the flag (``argument --nproc: must be an integer >= 1, got '0'``) instead of a
library traceback later. A leaf: imports nothing from embtables. (Budgets and sizes are
checked by :func:`embtables.embeddings.budget.budget_arg` / ``size_arg``.)"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    check.__name__ = f"int>={low}"
    return check


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def finite_float(text: str) -> float:
    return _float(text, "a number")


def positive_float(text: str) -> float:
    value = _float(text, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def fraction_below_one(text: str) -> float:
    """A share in [0, 1)."""
    value = _float(text, "a fraction in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text!r}")
    return value


def table_dim(text: str) -> int:
    value = positive_int(text)
    if value % 4:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of 4 (FBGEMM's kernels need it), got {text!r}")
    return value
