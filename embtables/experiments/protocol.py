"""The comparison protocol's choices (docs/compare.md, "The protocol").

1. **Epochs**, once per (model, dataset): `full` at budget 1, the tuning seed, one cell per
   candidate epoch count; the count with the highest validation AUC is used by every cell.
2. **Embedding learning rate**, per method: one cell per factor of the method's base LR at
   the tuning budget (budget 1 for `full`, which cannot compress), the tuning seed and the
   chosen epochs; the factor with the highest validation AUC is used for all its cells.
3. **Init scale**, for the methods ``protocol.init_scale`` lists: one cell per factor of
   ``embedding.init_scale`` at that method's LR cell (tuning budget and seed, chosen epochs
   and LR; the factor-1 cell is the LR cell itself), chosen the same way.
4. The reported cells: every method, budget and seed with those settings.

The choice is a pure function of the tuning cells' summaries (``valid_auc``), recomputed
on every invocation and written to ``protocol.json``. Ties: the equal AUC closest to
the base (factor 1, then the smaller factor) or the fewest epochs. A candidate whose cell
failed is out of the choice; a method none of whose tuning cells finished keeps its base
LR (factor 1) and the record says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from embtables.experiments.sweep_config import Cell, SweepPlan

PROTOCOL_FILE = "protocol.json"
METRIC = "valid_auc"

Summaries = Mapping[str, Mapping[str, Any] | None]  # cell id -> summary.json (None: not finished)


def _score(summary: Mapping[str, Any] | None) -> float | None:
    v = (summary or {}).get(METRIC)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _state(cell: Cell, summaries: Summaries, failed: set[str]) -> str:
    if summaries.get(cell.cell_id) is not None:
        return "done"
    return "failed" if cell.cell_id in failed else "pending"


def group_key(group: tuple[str, str]) -> str:
    return f"{group[0]} on {group[1]}"


def choose_epochs(cells: list[Cell], summaries: Summaries, failed: set[str]) -> tuple[
        dict[tuple[str, str], int], dict[str, Any], list[tuple[str, str]]]:
    """Per group: the chosen epochs (once none of its cells is pending), the record, and
    the groups still waiting (a cell pending, or no candidate with a validation AUC).
    ``failed``: ids of failed cells."""
    chosen: dict[tuple[str, str], int] = {}
    record: dict[str, Any] = {}
    waiting: list[tuple[str, str]] = []
    by_group: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        by_group.setdefault(c.group, []).append(c)
    for g, cs in by_group.items():
        cands = [
            {
                "epochs": c.config.train.epochs,
                "cell_id": c.cell_id,
                METRIC: _score(summaries.get(c.cell_id)),
                "state": _state(c, summaries, failed),
            }
            for c in cs
        ]
        rec: dict[str, Any] = {"candidates": cands, "chosen": None}
        record[group_key(g)] = rec
        if any(x["state"] == "pending" for x in cands):
            waiting.append(g)
            rec["note"] = "waiting for its tuning cells"
            continue
        scored = [x for x in cands if x[METRIC] is not None]
        if not scored:
            waiting.append(g)
            rec["note"] = "no candidate finished with a validation AUC (see the cells' status.json)"
            continue
        best = max(scored, key=lambda x: (x[METRIC], -x["epochs"]))
        chosen[g] = rec["chosen"] = int(best["epochs"])
    return chosen, record, waiting


def choose_lr(
    cells: list[Cell], summaries: Summaries, failed: set[str]
) -> tuple[dict[tuple[str, str, str], float], dict[str, Any], list[tuple[str, str, str]]]:
    """Per (group, method label): the chosen LR factor, the record, and the methods whose
    tuning cells are not all finished or failed yet. ``failed``: ids of failed cells."""
    return _choose_factor(cells, summaries, failed, "lr")


def choose_init(
    cells: list[Cell], summaries: Summaries, failed: set[str]
) -> tuple[dict[tuple[str, str, str], float], dict[str, Any], list[tuple[str, str, str]]]:
    """As :func:`choose_lr`, for the init-scale factor of the methods that tune it."""
    return _choose_factor(cells, summaries, failed, "init")


def _choose_factor(
    cells: list[Cell], summaries: Summaries, failed: set[str], what: str
) -> tuple[dict[tuple[str, str, str], float], dict[str, Any], list[tuple[str, str, str]]]:
    def factor(c: Cell) -> float:
        f = c.lr_factor if what == "lr" else c.init_factor
        return 1.0 if f is None else float(f)

    def value(c: Cell) -> float:
        return c.config.train.embedding_optimizer.lr if what == "lr" else c.config.embedding.init_scale

    chosen: dict[tuple[str, str, str], float] = {}
    record: dict[str, Any] = {}
    waiting: list[tuple[str, str, str]] = []
    by_method: dict[tuple[str, str, str], list[Cell]] = {}
    for c in cells:
        by_method.setdefault((*c.group, c.method.label), []).append(c)
    for key, cs in by_method.items():
        cands = [
            {
                "factor": factor(c),
                what: value(c),
                "budget": c.budget.label,
                "cell_id": c.cell_id,
                METRIC: _score(summaries.get(c.cell_id)),
                "state": _state(c, summaries, failed),
            }
            for c in cs
        ]
        rec: dict[str, Any] = {"candidates": cands, "chosen_factor": None, f"chosen_{what}": None}
        record.setdefault(group_key(key[:2]), {})[key[2]] = rec
        if any(x["state"] == "pending" for x in cands):
            waiting.append(key)
            rec["note"] = "waiting for its tuning cells"
            continue
        scored = [x for x in cands if x[METRIC] is not None]
        if scored:
            best = max(scored, key=lambda x: (x[METRIC], -abs(math.log(x["factor"])), -x["factor"]))
        else:
            best = min(cands, key=lambda x: (abs(math.log(x["factor"])), x["factor"]))
            base = "LR" if what == "lr" else "init scale"
            rec["note"] = f"no tuning cell finished with a validation AUC: the base {base} (factor 1) is kept"
            best = {**best, "factor": 1.0, what: best[what] / best["factor"]}
        chosen[key] = rec["chosen_factor"] = float(best["factor"])
        rec[f"chosen_{what}"] = float(best[what])
    return chosen, record, waiting


def protocol_record(
    plan: SweepPlan, epochs_rec: dict[str, Any], lr_rec: dict[str, Any] | None, complete: bool,
    init_rec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    assert plan.protocol is not None
    out = {
        "protocol": plan.protocol.to_json(),
        "complete": complete,
        "epochs": epochs_rec,
        "lr": lr_rec or {},
        "base_lr": plan.base.train.embedding_optimizer.lr,
        "base_epochs": plan.base.train.epochs,
    }
    if plan.protocol.init_methods:
        out["init_scale"] = init_rec or {}
        out["base_init_scale"] = plan.base.embedding.init_scale
    return out
