"""The "against the papers" table: published claims checked on a finished comparison.

Every figure comes from the cells (the results table of :mod:`embtables.experiments.report`);
nothing is typed in. Each claim is decided by paired differences over seeds with their
Student-t intervals (:mod:`embtables.experiments.stats`), by these rules (docs/compare.md,
"Against the papers"):

- **A >= B at equal memory** (Unified Embedding vs hashing; QR vs hashing), at each budget
  below 1 where both ran: *does not hold* if an interval lies below 0 at some budget;
  *holds* if none does and one lies above 0; otherwise *inconclusive* (every interval
  holds 0: a tie, consistent with the claim but no evidence for it).
- **The gap widens as memory shrinks**: per seed, (A - B) at the smallest budget minus
  (A - B) at the largest budget below 1; *holds* / *does not hold* if its interval lies
  above / below 0, else *inconclusive*.
- **Small loss at large compression** (TT-Rec) and **a smaller table at equal AUC**
  (OptEmbed), against `full` at budget 1 with the same seeds: *holds* if the interval's
  lower end is above -SMALL (the loss is smaller than SMALL AUC) and, for OptEmbed, the
  table is smaller; *does not hold* if its upper end is below -SMALL (or the table is not
  smaller); else *inconclusive*.
- **Quantized rows beat fewer rows** (4-bit row-wise tables, Guan et al. 2019): a method
  trained for serving at lower precision (``embedding.serve_dtype``: more rows in the same
  serving bytes) against the same method at training precision, with the rule of A >= B.
- **DARE beats DIN at equal memory**: dare - din for the same method, budget and seed
  (the same dataset), over every (method, budget) both ran where DARE's embedding bytes
  are at most DIN's (``model.dare.attention_share`` makes them so), with the rule of A >= B.

A claim whose methods (or models) are not in the comparison is *not run*; one with a
single seed has no interval and is *inconclusive*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from embtables.experiments.stats import Paired, paired

SMALL = 0.002  # AUC: what "small loss" and "equal AUC" allow
HOLDS, NOT_HOLD, INCONCLUSIVE, NOT_RUN = "holds", "does not hold", "inconclusive", "not run"


@dataclass(frozen=True)
class Claim:
    claim: str
    paper: str
    dataset: str
    figure: str
    interval: str
    verdict: str


def _done(df: pd.DataFrame) -> pd.DataFrame:
    d = df[(df["status"] == "done")].copy()
    d["auc"] = pd.to_numeric(d["auc"], errors="coerce")
    return d[d["auc"].notna()]


def _by_seed(d: pd.DataFrame, label: str, budget: str) -> dict[int, float]:
    sub = d[(d["method_label"] == label) & (d["budget"].astype(str) == budget)]
    return {int(s): float(a) for s, a in zip(sub["seed"], sub["auc"], strict=True)}


def _budget_order(d: pd.DataFrame) -> list[str]:
    """Budgets largest first (fractions by value, byte budgets by their share of full)."""
    size: dict[str, float] = {}
    for _, r in d.iterrows():
        frac = r.get("budget_fraction")
        if frac is None or (isinstance(frac, float) and math.isnan(frac)):
            bb, fb = pd.to_numeric(r.get("budget_bytes"), errors="coerce"), pd.to_numeric(r.get("full_bytes"),
                                                                                            errors="coerce")
            frac = float(bb) / float(fb) if fb and not math.isnan(fb) and not math.isnan(bb) else math.nan
        size[str(r["budget"])] = float(frac)
    return sorted(size, key=lambda b: -size[b] if not math.isnan(size[b]) else math.inf)


def _compressed(d: pd.DataFrame) -> list[str]:
    order = _budget_order(d)
    fr = {str(b): f for b, f in zip(d["budget"], pd.to_numeric(d["budget_fraction"], errors="coerce"),
                                    strict=True)}
    return [b for b in order if not (fr.get(b) is not None and not math.isnan(fr[b]) and fr[b] >= 1)]


def _labels(d: pd.DataFrame, method: str) -> list[str]:
    return list(dict.fromkeys(d[d["method"] == method]["method_label"]))


def _fmt_list(items: list[tuple[str, Paired]], what: str) -> str:
    if what == "figure":
        return "; ".join(f"{p.mean:+.4f} at {b}" for b, p in items)
    return "; ".join(f"{_iv(p)} at {b}" for b, p in items)


def _iv(p: Paired) -> str:
    return f"[{p.lo:+.4f}, {p.hi:+.4f}]" if p.has_interval else f"none (n={p.n})"


def _at_least(items: list[Paired]) -> str:
    signs = [p.sign() for p in items]
    if any(s < 0 for s in signs):
        return NOT_HOLD
    if any(s > 0 for s in signs):
        return HOLDS
    return INCONCLUSIVE


def _sided(p: Paired | None) -> str:
    if p is None or not p.has_interval:
        return INCONCLUSIVE
    return HOLDS if p.sign() > 0 else NOT_HOLD if p.sign() < 0 else INCONCLUSIVE


def _noninferior(p: Paired | None, small: float) -> str:
    if p is None or not p.has_interval:
        return INCONCLUSIVE
    if p.lo > -small:  # type: ignore[operator]
        return HOLDS
    if p.hi < -small:  # type: ignore[operator]
        return NOT_HOLD
    return INCONCLUSIVE


def _at_least_rows(d: pd.DataFrame, a: str, b: str, name: str, paper: str, ds: str,
                   widening: bool) -> list[Claim]:
    pairs = [(bud, paired(_by_seed(d, a, bud), _by_seed(d, b, bud))) for bud in _compressed(d)]
    items = [(bud, p) for bud, p in pairs if p is not None]
    if not items:
        return [Claim(name, paper, ds, "—", "—", NOT_RUN)]
    out = [Claim(name, paper, ds, _fmt_list(items, "figure"), _fmt_list(items, "interval"),
                 _at_least([p for _, p in items]))]
    if widening:
        wname = f"`{a}` − `{b}` grows as memory shrinks"
        if len(items) < 2:
            out.append(Claim(wname, paper, ds, "one budget below 1", "—", NOT_RUN))
        else:
            (b_large, _), (b_small, _) = items[0], items[-1]
            gap = {}
            for bud in (b_large, b_small):
                x, y = _by_seed(d, a, bud), _by_seed(d, b, bud)
                gap[bud] = {s: x[s] - y[s] for s in x if s in y}
            p = paired(gap[b_small], gap[b_large])
            fig = f"{p.mean:+.4f} ({b_small} vs {b_large})" if p else "no common seed"
            out.append(Claim(wname, paper, ds, fig, _iv(p) if p else "—", _sided(p) if p else INCONCLUSIVE))
    return out


def _vs_full(
    d: pd.DataFrame, label: str, full: str | None, *, smallest: bool
) -> tuple[str | None, Paired | None, float | None]:
    """(budget, paired label@budget - full@1, compression full bytes / label bytes)."""
    if full is None:
        return None, None, None
    buds = [b for b in _budget_order(d) if _by_seed(d, label, b)]
    if not buds:
        return None, None, None
    bud = buds[-1] if smallest else buds[0]
    ref_budget = next((b for b in _budget_order(d) if _by_seed(d, full, b)), None)
    if ref_budget is None:
        return bud, None, None
    p = paired(_by_seed(d, label, bud), _by_seed(d, full, ref_budget))
    mine = d[(d["method_label"] == label) & (d["budget"].astype(str) == bud)]["embedding_bytes"]
    ref = d[(d["method_label"] == full) & (d["budget"].astype(str) == ref_budget)]["embedding_bytes"]
    mb, rb = pd.to_numeric(mine, errors="coerce").mean(), pd.to_numeric(ref, errors="coerce").mean()
    ratio = float(rb / mb) if mb and not math.isnan(mb) and not math.isnan(rb) else None
    return bud, p, ratio


def evaluate_claims(df: pd.DataFrame, reference: str = "hash", small: float = SMALL) -> list[Claim]:
    """Every claim, per (model, dataset) section of the comparison (DARE: per dataset)."""
    out: list[Claim] = []
    done = _done(df)
    groups = list(dict.fromkeys(zip(df["model_label"], df["dataset_label"], strict=True)))
    for model, dataset in groups:
        d = done[(done["model_label"] == model) & (done["dataset_label"] == dataset)]
        ds = f"{dataset} ({model})"
        hashes = _labels(d, "hash")
        h = reference if reference in hashes else (hashes[0] if hashes else None)
        for u in _labels(d, "unified") or [None]:
            if u is None or h is None:
                out.append(
                    Claim(
                        "`unified` ≥ `hash` at equal memory",
                        "Unified Embedding (Coleman et al. 2023)",
                        ds,
                        "—",
                        "—",
                        NOT_RUN,
                    )
                )
                continue
            out += _at_least_rows(
                d,
                u,
                h,
                f"`{u}` ≥ `{h}` at equal memory",
                "Unified Embedding (Coleman et al. 2023)",
                ds,
                widening=True,
            )
        for q in _labels(d, "qr") or [None]:
            if q is None or h is None:
                out.append(
                    Claim(
                        "`qr` ≥ `hash` at equal memory", "QR trick (Shi et al. 2020)", ds, "—", "—", NOT_RUN
                    )
                )
                continue
            out += _at_least_rows(
                d, q, h, f"`{q}` ≥ `{h}` at equal memory", "QR trick (Shi et al. 2020)", ds, widening=False
            )
        fulls = _labels(d, "full")
        full = fulls[0] if fulls else None
        for t in _labels(d, "tt") or [None]:
            name = f"`{t or 'tt'}`: loss < {small} AUC at its largest compression"
            bud, p, ratio = _vs_full(d, t, full, smallest=True) if t else (None, None, None)
            if p is None:
                out.append(Claim(name, "TT-Rec (Yin et al. 2021)", ds, "—", "—", NOT_RUN))
                continue
            fig = f"{p.mean:+.4f} vs `{full}` at {bud}" + (f" ({ratio:.0f}× smaller)" if ratio else "")
            out.append(Claim(name, "TT-Rec (Yin et al. 2021)", ds, fig, _iv(p), _noninferior(p, small)))
        for o in _labels(d, "optembed") or [None]:
            name = f"`{o or 'optembed'}`: a smaller table at equal AUC (within {small})"
            bud, p, ratio = _vs_full(d, o, full, smallest=False) if o else (None, None, None)
            if p is None:
                out.append(Claim(name, "OptEmbed (Lyu et al. 2022)", ds, "—", "—", NOT_RUN))
                continue
            verdict = NOT_HOLD if ratio is not None and ratio <= 1 else _noninferior(p, small)
            fig = f"{p.mean:+.4f} vs `{full}` at {bud}" + (f", {ratio:.1f}× smaller" if ratio else "")
            out.append(Claim(name, "OptEmbed (Lyu et al. 2022)", ds, fig, _iv(p), verdict))
        out += _served_claims(d, h, ds)
    out += _dare_claims(done, df)
    return out


def _served_claims(d: pd.DataFrame, h: str | None, ds: str) -> list[Claim]:
    """Rows trained for serving quantized (``embedding.serve_dtype``) against the same method
    at training precision, at equal (serving) memory; only where such rows ran."""
    if "training_embedding_bytes" not in d:
        return []
    served = pd.to_numeric(d["training_embedding_bytes"], errors="coerce").notna()
    out = []
    for s in dict.fromkeys(d[served]["method_label"]):
        method = d[d["method_label"] == s]["method"].iloc[0]
        plain = list(dict.fromkeys(d[~served & (d["method"] == method)]["method_label"]))
        base = h if method == "hash" and h in plain else (plain[0] if plain else None)
        paper = "4-bit row-wise tables (Guan et al. 2019)"
        if base is None:
            out.append(Claim(f"`{s}` ≥ `{method}` at equal memory", paper, ds, "—", "—", NOT_RUN))
            continue
        out += _at_least_rows(d, s, base, f"`{s}` ≥ `{base}` at equal memory", paper, ds, widening=False)
    return out


def _dare_claims(done: pd.DataFrame, df: pd.DataFrame) -> list[Claim]:
    name, paper = "`dare` > `din` at equal memory", "DARE (Feng et al. 2024)"
    if "model" not in done:
        return [Claim(name, paper, "—", "—", "—", NOT_RUN)]
    out, unequal = [], 0
    for dataset in dict.fromkeys(df["dataset_label"]):
        d = done[done["dataset_label"] == dataset]
        din, dare = d[d["model"] == "din"], d[d["model"] == "dare"]
        items: list[tuple[str, Paired]] = []
        for (label, bud), a in dare.groupby(["method_label", "budget"], sort=False):
            b = din[(din["method_label"] == label) & (din["budget"] == bud)]
            if not _within_memory(a, b):
                unequal += 1
                continue
            p = paired(
                {int(s): float(x) for s, x in zip(a["seed"], a["auc"], strict=True)},
                {int(s): float(x) for s, x in zip(b["seed"], b["auc"], strict=True)},
            )
            if p is not None:
                items.append((f"{label} {bud}", p))
        if not items:
            continue
        out.append(
            Claim(
                name,
                paper,
                str(dataset),
                _fmt_list(items, "figure"),
                _fmt_list(items, "interval"),
                _at_least([p for _, p in items]),
            )
        )
    if out:
        return out
    why = (f"{unequal} (method, budget) pairs where `dare` holds more embedding memory than `din`: "
           "set model.dare.attention_share" if unequal else "needs `din` and `dare` in one comparison")
    return [Claim(name, paper, "—", "—", "—", f"{NOT_RUN} ({why})")]


def _within_memory(mine: pd.DataFrame, ref: pd.DataFrame) -> bool:
    """Whether ``mine``'s embedding bytes are at most ``ref``'s (means over seeds; a cell
    without a size counts as not equal)."""
    a = pd.to_numeric(mine["embedding_bytes"], errors="coerce").mean()
    b = pd.to_numeric(ref["embedding_bytes"], errors="coerce").mean()
    return bool(a <= b) if not (math.isnan(a) or math.isnan(b)) else False


def render_claims(claims: list[Claim]) -> str:
    lines = [
        "| claim | paper | dataset | our figure (paired difference) | 95% interval | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in claims:
        lines.append(f"| {c.claim} | {c.paper} | {c.dataset} | {c.figure} | {c.interval} | **{c.verdict}** |")
    return "\n".join(lines)
