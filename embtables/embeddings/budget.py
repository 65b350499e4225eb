"""Memory budgets: a fraction of the full tables' size, or bytes ("4MiB", "2GB").

The one rule, everywhere a budget is read (run configs, ``--set``, ``embtables size``,
comparison files, the Python API): a number in (0, 1] -- ``1``, ``1.0``, ``0.25``,
``"1/16"`` -- is a fraction of the full size (so ``1`` is the whole size, never one
byte); an integer above 1 or a size with a unit (``"4MiB"``, ``"2GB"``, ``"1000B"``)
is bytes. Anything else (``1.5``, ``"3/2"``, ``"1/0"``, ``0``) is an error that states
this rule.

Torch-free (the CLI validates ``--budget`` while building its parser's arguments).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from embtables.embeddings.spec import FeatureSpec

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
#: Table weight dtypes (``embedding.dtype``) and their bytes per value.
DType = Literal["fp32", "fp16"]
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2}
BUDGET_RULE = ("a budget is a fraction of the full size -- a number in (0, 1] such as 1, 0.25 or 1/16 "
               "(1 is the whole size) -- or bytes: an integer above 1 or a size with a unit such as 4MiB")


def full_bytes(features: list[FeatureSpec], dim: int) -> int:
    """Size a fractional budget refers to: sum(cardinality) * dim * 4 bytes (fp32)."""
    return sum(f.cardinality for f in features) * dim * 4


def parse_bytes(text: str) -> int:
    """'4MiB' -> 4194304 (binary), '2GB' -> 2e9 (decimal), '1000' -> 1000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a size: use a number of bytes or a unit "
            "(KiB, MiB, GiB, TiB binary; KB, MB, GB, TB decimal), e.g. '4MiB'"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_budget_value(budget: float | int | str) -> tuple[Fraction | None, int | None]:
    """(fraction, None) or (None, bytes) by the rule in the module docstring; ValueError
    (stating the rule) for anything else. No dataset needed: this is the syntax check."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise ValueError(f"budget {budget!r} is not a number or a size; {BUDGET_RULE}")
    if isinstance(budget, str):
        s = budget.strip()
        m = re.fullmatch(r"([0-9]+)\s*/\s*([0-9]+)", s)
        if m:
            num, den = int(m.group(1)), int(m.group(2))
            if den == 0 or num == 0 or num > den:
                raise ValueError(f"budget {s!r} is not a fraction in (0, 1]; {BUDGET_RULE}")
            return Fraction(num, den), None
        if re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", s):
            value = float(s)
            return parse_budget_value(int(value) if value.is_integer() and value > 1 else value)
        try:
            nbytes = parse_bytes(s)
        except ValueError:
            raise ValueError(f"budget {s!r} is not a fraction or a size; {BUDGET_RULE}") from None
        if nbytes < 1:
            raise ValueError(f"budget {s!r} is less than one byte; {BUDGET_RULE}")
        return None, nbytes
    if not budget > 0 or budget != budget or budget == float("inf"):
        raise ValueError(f"budget must be positive, got {budget!r}; {BUDGET_RULE}")
    if budget <= 1:
        return Fraction(budget).limit_denominator(1 << 20), None
    if isinstance(budget, float) and not budget.is_integer():
        raise ValueError(f"budget {budget!r} is ambiguous: above 1 but not whole bytes; {BUDGET_RULE}")
    return None, int(budget)


def budget_arg(text: str) -> str:
    """argparse ``type=`` for ``--budget``: the rule above, its error naming the flag."""
    import argparse

    try:
        parse_budget_value(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def size_arg(text: str) -> str:
    """argparse ``type=`` for a memory size such as ``80GiB``."""
    import argparse

    try:
        if parse_bytes(text) < 1:
            raise ValueError(f"size {text!r} is less than one byte")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def resolve_budget(budget: float | int | str | None, features: list[FeatureSpec], dim: int) -> int | None:
    """Budget in bytes (see the module docstring for the rule)."""
    if budget is None:
        return None
    frac, nbytes = parse_budget_value(budget)
    if frac is not None:
        return int(float(frac) * full_bytes(features, dim))
    return nbytes


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class BudgetTooSmall(ValueError):
    """The budget is below what a method can build; the message names the minimum."""

    def __init__(self, method: str, minimum: int, budget: int, detail: str = "") -> None:
        self.minimum, self.budget = minimum, budget
        super().__init__(
            f"{method}: budget {format_bytes(budget)} ({budget} bytes) is below the minimum this method "
            f"can build, {format_bytes(minimum)} ({minimum} bytes){': ' + detail if detail else ''}. "
            f"Raise embedding.budget to at least {minimum} bytes or pick another method/knobs."
        )


def split_budget(total: float, weights: list[float], mins: list[float], caps: list[float]) -> list[float]:
    """Water-filling: share_i = clip(lam * weights_i, mins_i, caps_i) with sum(share) = total.

    ``caps`` are the collisionless (full) costs: a feature whose share would exceed
    its cap keeps its full table and the excess flows to the others. If even the caps
    fit, everyone gets the cap. The caller checks ``sum(mins) <= total`` first.
    """
    if sum(caps) <= total:
        return list(caps)
    if sum(mins) > total:
        raise ValueError("split_budget: sum of minimums exceeds the total")

    def shares(lam: float) -> list[float]:
        return [min(c, max(m, lam * w)) for w, m, c in zip(weights, mins, caps, strict=True)]

    lo, hi = 0.0, max(c / w for c, w in zip(caps, weights, strict=True) if w > 0)
    for _ in range(200):  # bisection on the water level; sum(shares) is monotone in lam
        mid = (lo + hi) / 2
        if sum(shares(mid)) > total:
            hi = mid
        else:
            lo = mid
    return shares(lo)


def feature_weights(cardinalities: list[int], power: float = 0.5) -> list[float]:
    """Budget weights: cardinality ** 0.5 (see docs/readme/methods.md, "Budgets").

    Shares proportional to cardinality itself would give every feature the same
    fraction of its vocabulary (so no feature would ever be collisionless and a
    4-id feature would get 0.4 rows at 10%); the square root favours small
    features, which water-filling then caps at their full size.
    """
    return [float(n) ** power for n in cardinalities]
