"""Paired differences over seeds and their Student-t intervals (docs/compare.md, "Protocol").

Two methods run with the same seed see the same data order and the same dense init, so
their per-seed AUC difference removes much of the seed-to-seed spread that both share.
For seeds s = 1..n with differences d_s = a_s - b_s the interval is

    mean(d) +- t_{(1+level)/2, n-1} * sd(d) / sqrt(n)        (sd with n - 1)

with the Student t quantile. With n = 3 seeds t_{0.975, 2} = 4.30: an interval is about
2.5 times the sample std of the differences wide on each side, so only gaps well above the
seed noise come out as differences; the rest are ties.

The quantile comes from scipy (installed with scikit-learn, a dependency); without scipy
a table of the 95% two-sided quantiles for 1..30 degrees of freedom is used (other levels
then need scipy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# t_{0.975, df} for df = 1..30 (two-sided 95%), to 3 decimals.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
LEVEL = 0.95


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t quantile: degrees of freedom must be >= 1, got {df}")
    try:
        from scipy.special import stdtrit  # the inverse of Student's t distribution function
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        if level != LEVEL or df > len(T975):
            raise ValueError(f"t quantile for df={df}, level={level} needs scipy "
                             f"(the built-in table covers level 0.95, df 1..{len(T975)})") from None
        return T975[df - 1]
    return float(stdtrit(df, 0.5 + level / 2))


@dataclass(frozen=True)
class Paired:
    """mean of a - b over the seeds both have, its sample std, n, and the interval (None if n < 2)."""

    mean: float
    sd: float | None
    n: int
    lo: float | None
    hi: float | None
    seeds: tuple[int, ...]

    @property
    def has_interval(self) -> bool:
        return self.lo is not None and self.hi is not None

    def sign(self) -> int:
        """+1: the interval lies above 0; -1: below; 0: it holds 0 (a tie) or there is none."""
        if not self.has_interval:
            return 0
        if self.lo > 0:  # type: ignore[operator]
            return 1
        if self.hi < 0:  # type: ignore[operator]
            return -1
        return 0

    def fmt(self, digits: int = 4) -> str:
        if not self.has_interval:
            return f"{self.mean:+.{digits}f} (n={self.n}, no interval)"
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    if not n:
        raise ValueError("mean of no values")
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def paired(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Paired | None:
    """a - b over the seeds present (and finite) in both; None when they share no seed."""
    seeds = tuple(sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s])))
    if not seeds:
        return None
    d = [float(a[s]) - float(b[s]) for s in seeds]
    m, sd = mean_sd(d)
    if sd is None:
        return Paired(m, None, 1, None, None, seeds)
    half = t_quantile(len(d) - 1, level) * sd / math.sqrt(len(d))
    return Paired(m, sd, len(d), m - half, m + half, seeds)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
