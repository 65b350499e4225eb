"""The "against the papers" table and the paired statistics, on synthetic result tables
whose answers are known by construction (no training)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from embtables.experiments.claims import (
    HOLDS,
    INCONCLUSIVE,
    NOT_HOLD,
    NOT_RUN,
    evaluate_claims,
    render_claims,
)
from embtables.experiments.stats import T975, paired, t_quantile

FRAC = {"1": 1.0, "1/4": 0.25, "1/16": 0.0625}
NOISE = {0: 0.0, 1: 0.004, 2: -0.003}  # a per-seed shift every method shares: pairing removes it


def _rows(method: str, budget: str, aucs: dict[int, float], *, label: str | None = None, model: str = "dlrm",
          nbytes: int = 1000, dataset: str = "synth") -> list[dict]:
    return [
        {
            "method": method,
            "method_label": label or method,
            "budget": budget,
            "budget_fraction": FRAC[budget],
            "budget_bytes": int(4000 * FRAC[budget]),
            "full_bytes": 4000,
            "seed": s,
            "auc": a,
            "status": "done",
            "model_label": model,
            "model": model,
            "dataset_label": dataset,
            "embedding_bytes": nbytes,
        }
        for s, a in aucs.items()
    ]


def _seeds(base: float, jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> dict[int, float]:
    return {s: base + NOISE[s] + jitter[s] for s in (0, 1, 2)}


def _by(claims, prefix):
    return [c for c in claims if c.claim.startswith(prefix)]


def test_t_quantiles_and_a_hand_computed_interval():
    assert [round(t_quantile(df), 3) for df in range(1, 31)] == list(T975)
    assert t_quantile(2) == pytest.approx(4.302653, abs=1e-6)
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, half-width 4.3027 * 0.01 / sqrt(3) = 0.024841
    p = paired({0: 0.71, 1: 0.72, 2: 0.73, 3: 0.9}, {0: 0.70, 1: 0.70, 2: 0.70})
    assert p.n == 3 and p.seeds == (0, 1, 2) and p.mean == pytest.approx(0.02)
    assert p.lo == pytest.approx(0.02 - 0.024841, abs=1e-6) and p.hi == pytest.approx(
        0.02 + 0.024841, abs=1e-6
    )
    assert p.sign() == 0  # holds 0: a tie
    one = paired({0: 0.8}, {0: 0.7, 1: 0.7})
    assert one.n == 1 and not one.has_interval and one.sign() == 0
    assert paired({1: 0.8}, {0: 0.7}) is None
    assert paired({0: 0.8, 1: math.nan}, {0: 0.7, 1: 0.7}).seeds == (0,)  # a NaN seed is left out


def test_claims_with_known_answers():
    rows = _rows("full", "1", _seeds(0.760), nbytes=4000)
    rows += _rows("hash", "1", _seeds(0.760), nbytes=4000)
    rows += _rows("hash", "1/4", _seeds(0.750), nbytes=1000)
    rows += _rows("hash", "1/16", _seeds(0.720), nbytes=250)
    # unified: +0.002 +- a little at 1/4 (a tie), +0.030 at 1/16 (clearly above): holds, and widens
    rows += _rows("unified", "1", _seeds(0.760), nbytes=4000)
    rows += _rows("unified", "1/4", _seeds(0.752, (0.003, -0.003, 0.0)), nbytes=1000)
    rows += _rows("unified", "1/16", _seeds(0.750, (0.001, -0.001, 0.0)), nbytes=250)
    # qr: clearly below hash at 1/16 -> does not hold; qr3 ties everywhere -> inconclusive
    rows += _rows("qr", "1/4", _seeds(0.750, (0.001, -0.001, 0.0)), nbytes=1000)
    rows += _rows("qr", "1/16", _seeds(0.700, (0.001, -0.001, 0.0)), nbytes=250)
    rows += _rows("qr", "1/4", _seeds(0.750, (0.004, -0.004, 0.0)), label="qr3", nbytes=1000)
    rows += _rows("qr", "1/16", _seeds(0.720, (0.004, -0.004, 0.0)), label="qr3", nbytes=250)
    # tt at 1/16 loses 0.0005 +- 0.0001 against full at 1: within 0.002 -> holds; 16x smaller
    rows += _rows("tt", "1/4", _seeds(0.759), nbytes=1000)
    rows += _rows("tt", "1/16", _seeds(0.7595, (0.0001, -0.0001, 0.0)), nbytes=250)
    # optembed loses 0.01 against full: does not hold
    rows += _rows("optembed", "1", _seeds(0.750, (0.0005, -0.0005, 0.0)), nbytes=400)
    claims = evaluate_claims(pd.DataFrame(rows), "hash")
    (u,) = _by(claims, "`unified` ≥")
    assert (
        u.verdict == HOLDS and u.figure == "+0.0020 at 1/4; +0.0300 at 1/16" and u.dataset == "synth (dlrm)"
    )
    (w,) = _by(claims, "`unified` − `hash` grows")
    assert w.verdict == HOLDS and w.figure.startswith("+0.0280 (1/16 vs 1/4)")
    assert _by(claims, "`qr` ≥")[0].verdict == NOT_HOLD
    assert _by(claims, "`qr3` ≥")[0].verdict == INCONCLUSIVE
    (t,) = _by(claims, "`tt`")
    assert t.verdict == HOLDS and t.figure == "-0.0005 vs `full` at 1/16 (16× smaller)"
    (o,) = _by(claims, "`optembed`")
    assert o.verdict == NOT_HOLD and "10.0× smaller" in o.figure
    assert _by(claims, "`dare`")[0].verdict.startswith(NOT_RUN)
    table = render_claims(claims)
    assert table.count("\n") == len(claims) + 1 and "| **holds** |" in table


def test_a_tt_loss_beyond_the_margin_and_a_table_that_is_not_smaller():
    rows = _rows("full", "1", _seeds(0.760), nbytes=4000)
    rows += _rows("tt", "1/16", _seeds(0.750, (0.0001, -0.0001, 0.0)), nbytes=250)  # loses 0.01
    rows += _rows("optembed", "1", _seeds(0.760, (0.0001, -0.0001, 0.0)), nbytes=4000)  # equal AUC, same size
    claims = evaluate_claims(pd.DataFrame(rows))
    assert _by(claims, "`tt`")[0].verdict == NOT_HOLD
    assert _by(claims, "`optembed`")[0].verdict == NOT_HOLD
    assert _by(claims, "`unified` ≥")[0].verdict == NOT_RUN  # neither unified nor hash ran


def test_one_seed_is_inconclusive_and_dare_against_din():
    rows = _rows("hash", "1/4", {0: 0.70}) + _rows("unified", "1/4", {0: 0.80})
    rows += _rows("hash", "1/16", {0: 0.60}) + _rows("unified", "1/16", {0: 0.80})
    claims = evaluate_claims(pd.DataFrame(rows))
    assert _by(claims, "`unified` ≥")[0].verdict == INCONCLUSIVE  # +0.1 and +0.2, but no interval
    assert "none (n=1)" in _by(claims, "`unified` ≥")[0].interval
    seq = []
    for model, base in (("din", 0.700), ("dare", 0.720)):
        for b in ("1", "1/4"):
            seq += _rows("hash", b, _seeds(base, (0.001, -0.001, 0.0)), model=model, dataset="beauty")
    (d,) = _by(evaluate_claims(pd.DataFrame(seq)), "`dare`")
    assert (
        d.verdict == HOLDS and d.dataset == "beauty" and d.figure == "+0.0200 at hash 1; +0.0200 at hash 1/4"
    )


def test_dare_is_paired_with_din_only_at_equal_memory():
    seq = []
    for b in ("1", "1/4"):
        seq += _rows("hash", b, _seeds(0.700), model="din", dataset="beauty", nbytes=1000)
    # at 1 DARE holds twice DIN's bytes (two whole modules); at 1/4 it fits in DIN's
    jit = (0.001, -0.001, 0.0)
    seq += _rows("hash", "1", _seeds(0.730, jit), model="dare", dataset="beauty", nbytes=2000)
    seq += _rows("hash", "1/4", _seeds(0.690, jit), model="dare", dataset="beauty", nbytes=990)
    (d,) = _by(evaluate_claims(pd.DataFrame(seq)), "`dare`")
    assert d.figure == "-0.0100 at hash 1/4" and d.verdict == NOT_HOLD
    only_more = [r for r in seq if not (r["model"] == "dare" and r["budget"] == "1/4")]
    (n,) = _by(evaluate_claims(pd.DataFrame(only_more)), "`dare`")
    assert n.verdict.startswith(NOT_RUN) and "attention_share" in n.verdict


def test_rows_trained_for_serving_are_checked_against_the_same_method():
    """A `hash` row sized for int4 serving (it has training bytes of its own) is paired with
    plain `hash` at each budget below 1; without such rows there is no such claim."""
    rows = _rows("hash", "1", _seeds(0.760), nbytes=4000)
    rows += _rows("hash", "1/4", _seeds(0.750), nbytes=1000)
    rows += _rows("hash", "1/16", _seeds(0.720), nbytes=250)
    assert not _by(evaluate_claims(pd.DataFrame(rows)), "`hash-int4`")
    served = _rows("hash", "1/4", _seeds(0.755), label="hash-int4", nbytes=990)
    served += _rows("hash", "1/16", _seeds(0.735), label="hash-int4", nbytes=245)
    for r in served:
        r["training_embedding_bytes"] = 4 * r["embedding_bytes"]
    (c,) = _by(evaluate_claims(pd.DataFrame(rows + served)), "`hash-int4` ≥ `hash`")
    assert c.verdict == "holds" and c.figure == "+0.0050 at 1/4; +0.0150 at 1/16"
    assert c.paper.startswith("4-bit row-wise tables")
