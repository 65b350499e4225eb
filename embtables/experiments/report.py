"""Results table, markdown report and plots of a comparison, from its cell directories alone.

``build_report(sweep_dir)`` reads ``sweep.json`` (the cells and their order; without it,
every ``*/cell.json``), each cell's ``summary.json`` or ``status.json``, and writes
``results.parquet``, ``results.csv``, ``report.md``, ``auc_vs_bytes*.png`` and
``time_vs_budget*.png``. Nothing here needs the comparison file or a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embtables.embeddings.budget import format_bytes
from embtables.experiments.claims import evaluate_claims, render_claims
from embtables.experiments.jsonfile import read_json
from embtables.experiments.protocol import PROTOCOL_FILE, group_key
from embtables.experiments.stats import LEVEL, Paired, paired, t_quantile
from embtables.experiments.sweep_dir import (
    CELL_FILE,
    PLAN_FILE,
    SKIP_NOT_LISTED,
    STATUS_FILE,
    SUMMARY_FILE,
    cell_state,
)

METRIC = "auc"
META_COLUMNS = ["cell_id", "method_label", "method", "knobs", "budget", "budget_fraction", "budget_bytes",
                "full_bytes", "seed", "model_label", "dataset_label", "epochs", "embedding_lr", "lr_factor",
                "init_scale", "status", "error", "error_type", "min_bytes", "attempts", "cell_seconds"]


# ---- results ------------------------------------------------------------------------------


def _cells(sweep_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    plan = read_json(sweep_dir / PLAN_FILE)
    if plan is not None:
        return plan["cells"], plan
    metas = [read_json(p) for p in sorted(sweep_dir.glob(f"*/{CELL_FILE}"))]
    metas = [m for m in metas if m]
    if not metas:
        raise FileNotFoundError(
            f"{sweep_dir}: no {PLAN_FILE} and no */{CELL_FILE}: not a comparison directory"
        )
    proto = read_json(sweep_dir / PROTOCOL_FILE)
    if proto is not None:  # the reported cells: those with the chosen epochs and LR
        metas = [m for m in metas if _chosen(m, proto)]
    methods = list(dict.fromkeys(m["method_label"] for m in metas))
    # largest budget first: fractions by value, then byte budgets by size
    size = {m["budget"]: (m.get("budget_fraction") or 0, m.get("budget_bytes") or 0) for m in metas}
    budgets = sorted(size, key=lambda b: size[b], reverse=True)
    return metas, {"name": sweep_dir.name, "methods": methods, "budgets": budgets}


def _chosen(meta: dict[str, Any], proto: dict[str, Any]) -> bool:
    g = group_key((meta.get("model_label", ""), meta.get("dataset_label", "")))
    ep = (proto.get("epochs", {}).get(g) or {}).get("chosen")
    lr = ((proto.get("lr", {}).get(g) or {}).get(meta.get("method_label")) or {}).get("chosen_lr")
    init_rec = (proto.get("init_scale", {}).get(g) or {}).get(meta.get("method_label"))
    init = (init_rec or {}).get("chosen_init") if init_rec is not None else proto.get("base_init_scale", 1.0)
    return (
        ep is not None
        and lr is not None
        and init is not None
        and meta.get("epochs") == ep
        and math.isclose(float(meta.get("embedding_lr") or 0), float(lr), rel_tol=1e-9)
        and math.isclose(float(meta.get("init_scale", 1.0)), float(init), rel_tol=1e-9)
    )


def collect_results(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per cell: the cell's choices, its status, and its summary.json fields."""
    sweep_dir = Path(sweep_dir)
    metas, _ = _cells(sweep_dir)
    rows = []
    for meta in metas:
        cdir = sweep_dir / meta["cell_id"]
        st = read_json(cdir / STATUS_FILE) or {}
        row: dict[str, Any] = {k: meta.get(k) for k in META_COLUMNS if k in meta}
        row["knobs"] = json.dumps(meta.get("knobs") or {}, sort_keys=True)
        row.update(
            status=cell_state(cdir),
            error=st.get("error"),
            error_type=st.get("error_type"),
            min_bytes=st.get("min_bytes"),
            attempts=st.get("attempts"),
            cell_seconds=st.get("seconds"),
        )
        summary = read_json(cdir / SUMMARY_FILE)
        if summary:
            for k, v in summary.items():
                if k in ("method", "seed"):
                    continue  # the cell's own
                row[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in META_COLUMNS:
        if col not in df:
            df[col] = None
    for col in (METRIC, "embedding_bytes", "train_seconds", "oracle_auc"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    # Parquet wants one type per column: a budget may be 0.25 in one cell and "4MiB" in another.
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {
                type(v) for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))
            }
            if len(kinds) > 1:
                df[col] = df[col].map(
                    lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                )
    return df


def write_results(df: pd.DataFrame, sweep_dir: Path) -> list[Path]:
    csv, parquet = sweep_dir / "results.csv", sweep_dir / "results.parquet"
    df.to_csv(csv, index=False)
    df.to_parquet(parquet, index=False)
    return [parquet, csv]


# ---- aggregation and table ---------------------------------------------------------------


def aggregate(df: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Per (model, dataset, method, budget): mean/std (ddof=1) of ``metric`` over finished seeds."""
    done = df[df["status"] == "done"]
    keys = ["model_label", "dataset_label", "method_label", "budget"]
    g = done.groupby(keys, sort=False)
    agg = pd.DataFrame(
        {
            "mean": g[metric].mean(),
            "std": g[metric].std(ddof=1),
            "n": g[metric].count(),
            "bytes": g["embedding_bytes"].mean(),
            "seconds": g["train_seconds"].mean(),
        }
    )
    total = df.groupby(keys, sort=False).size().rename("cells")
    out = agg.join(total, how="right").reset_index()
    out["n"] = out["n"].fillna(0).astype(int)
    return out


def _serving_section(gdf: pd.DataFrame, methods: list[str], budgets: list[str]) -> list[str]:
    """Rows trained for serving (``embedding.serve_dtype``): their AUC and bytes above are
    the quantized model's; what training held is here, beside the AUC before quantizing."""
    if "training_embedding_bytes" not in gdf:
        return []
    served = gdf[(gdf["status"] == "done") & gdf["training_embedding_bytes"].notna()]
    if not len(served):
        return []
    out = [
        "Rows trained for serving (`embedding.serve_dtype`): their AUC and memory above are the quantized "
        "model's, at the budget. What training held (tables at training precision, then the optimizer "
        "state) and the AUC before quantizing, mean over seeds:",
        "",
        "| method | serving dtype | " + " | ".join(budgets) + " |",
        "| --- | --- |" + " ---: |" * len(budgets),
    ]
    for m in [m for m in methods if m in set(served["method_label"])]:
        sub = served[served["method_label"] == m]
        dtypes = {json.loads(s)["dtype"] for s in sub["serving"] if isinstance(s, str)}
        cells = []
        for b in budgets:
            c = sub[sub["budget"] == b]
            if not len(c):
                cells.append("—")
                continue
            trained = [json.loads(s)["trained"]["auc"] for s in c["serving"] if isinstance(s, str)]
            auc = f"; AUC {np.mean(trained):.4f} before" if trained and None not in trained else ""
            opt = pd.to_numeric(c.get("optimizer_state_bytes"), errors="coerce").mean()
            cells.append(
                f"{format_bytes(c['training_embedding_bytes'].astype(float).mean())} + "
                f"{format_bytes(opt)} optimizer{auc}"
            )
        out.append(f"| {m} | {', '.join(sorted(dtypes))} | " + " | ".join(cells) + " |")
    return out + [""]


def fmt_mean_std(mean: float, std: float, n: int) -> str:
    if n > 1 and not math.isnan(std):
        return f"{mean:.4f} ± {std:.4f}"
    return f"{mean:.4f}"


def _empty_reason(cells: pd.DataFrame) -> str:
    st = set(cells["status"])
    if st & {"pending", "running"}:
        return "pending"
    if st == {"skipped"}:
        reasons = " ".join(str(e) for e in cells["error"].dropna())
        return "not run (method's budgets)" if SKIP_NOT_LISTED in reasons else "n/a (cannot compress)"
    if st == {"done"}:
        return "n/a (no AUC)"
    failed = cells[cells["status"] == "failed"]
    mins = pd.to_numeric(failed["min_bytes"], errors="coerce").dropna()
    if len(mins):
        return f"failed: budget < minimum {format_bytes(mins.max())}"
    kinds = set(failed["error_type"].dropna())
    if "TrainingDiverged" in kinds:
        return "failed: diverged (NaN loss)"
    return "failed: " + ", ".join(sorted(kinds)) if kinds else "failed"


def seed_values(df: pd.DataFrame, method: str, budget: str, metric: str = METRIC) -> dict[int, float]:
    """seed -> ``metric`` of the finished cells of (method label, budget) in ``df``."""
    sub = df[(df["method_label"] == method) & (df["budget"] == budget) & (df["status"] == "done")]
    vals = pd.to_numeric(sub[metric], errors="coerce")
    return {int(s): float(v) for s, v in zip(sub["seed"], vals, strict=True) if not math.isnan(v)}


def best_and_ties(
    df: pd.DataFrame, agg: pd.DataFrame, methods: list[str], budget: str
) -> tuple[str | None, dict[str, Paired | None]]:
    """The best mean at ``budget`` and, for every other method there, its paired
    difference with the best (None: no common seed)."""
    col = agg[(agg["budget"] == budget) & (agg["n"] > 0) & agg["method_label"].isin(methods)]
    col = col[col["mean"].notna()]
    if not len(col):
        return None, {}
    best = str(col.loc[col["mean"].idxmax(), "method_label"])
    ref = seed_values(df, best, budget)
    return best, {m: paired(seed_values(df, m, budget), ref) for m in col["method_label"] if m != best}


def _table(df: pd.DataFrame, agg: pd.DataFrame, methods: list[str], budgets: list[str], value: str) -> str:
    """method x budget markdown table of ``value`` (metric | bytes | seconds)."""
    best: dict[str, float] = {}
    ties: dict[str, dict[str, Paired | None]] = {}
    if value == "metric":
        for b in budgets:
            col = agg[(agg["budget"] == b) & (agg["n"] > 0)]["mean"]
            if len(col):
                best[b] = col.max()
            ties[b] = best_and_ties(df, agg, methods, b)[1]
    lines = ["| method | " + " | ".join(budgets) + " |", "| --- |" + " ---: |" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            a = agg[(agg["method_label"] == m) & (agg["budget"] == b)]
            sub = df[(df["method_label"] == m) & (df["budget"] == b)]
            if not len(sub):
                cells.append("")
                continue
            if not len(a) or not a["n"].iloc[0] or (value == "metric" and math.isnan(a["mean"].iloc[0])):
                cells.append(_empty_reason(sub) if value == "metric" else "—")
                continue
            r = a.iloc[0]
            if value == "metric":
                text = fmt_mean_std(r["mean"], r["std"], int(r["n"]))
                if best.get(b) is not None and r["mean"] == best[b]:
                    text = f"**{text}**"
                else:
                    p = ties.get(b, {}).get(m)
                    if p is not None and p.has_interval and p.sign() == 0:
                        text += " ≈"
            elif value == "bytes":
                text = format_bytes(r["bytes"])
            else:
                text = f"{r['seconds']:.1f}"
            if int(r["n"]) < int(r["cells"]):
                text += f" ({int(r['n'])}/{int(r['cells'])} seeds)"
            cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired_table(df: pd.DataFrame, methods: list[str], budgets: list[str], reference: str) -> str | None:
    """method x budget: paired difference against ``reference`` with its interval."""
    rows, any_value = [], False
    for m in methods:
        if m == reference:
            continue
        cells = []
        for b in budgets:
            p = paired(seed_values(df, m, b), seed_values(df, reference, b))
            if p is None:
                cells.append("—")
                continue
            any_value = True
            cells.append(p.fmt() if p.has_interval else f"{p.mean:+.4f} (1 seed)")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    if not any_value:
        return None
    head = [
        "| method − " + reference + " | " + " | ".join(budgets) + " |",
        "| --- |" + " ---: |" * len(budgets),
    ]
    return "\n".join(head + rows)


def _ranking(df: pd.DataFrame, agg: pd.DataFrame, methods: list[str], budgets: list[str]) -> str | None:
    lines = [
        "| budget | best mean | tied with the best (interval holds 0) | below the best (interval < 0) "
        "| no interval (1 seed) |",
        "| --- | --- | --- | --- | --- |",
    ]
    any_row = False
    for b in budgets:
        best, diffs = best_and_ties(df, agg, methods, b)
        if best is None:
            continue
        any_row = True
        order = sorted(diffs, key=lambda m: -(diffs[m].mean if diffs[m] is not None else -math.inf))
        tied = [
            f"{m} ({diffs[m].fmt()})"
            for m in order
            if diffs[m] is not None and diffs[m].has_interval and diffs[m].sign() == 0
        ]
        below = [f"{m} ({diffs[m].fmt()})" for m in order if diffs[m] is not None and diffs[m].sign() < 0]
        none = [m for m in order if diffs[m] is None or not diffs[m].has_interval]
        lines.append(
            f"| {b} | {best} | {', '.join(tied) or '—'} | {', '.join(below) or '—'} "
            f"| {', '.join(none) or '—'} |"
        )
    return "\n".join(lines) if any_row else None


def _groups(df: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(df["model_label"], df["dataset_label"], strict=True)))


def _suffix(groups: list[tuple[str, str]], g: tuple[str, str]) -> str:
    return "" if len(groups) == 1 else f"_{g[0]}_{g[1]}"


def quick_label(plan: dict[str, Any], seeds: list[int]) -> str:
    n = len(seeds) or len(plan.get("seeds") or [])
    return f"quick ({n} seed{'s' if n != 1 else ''}, smoke test)"


def _protocol_section(proto: dict[str, Any] | None, plan: dict[str, Any]) -> list[str]:
    if not plan.get("protocol"):
        if plan.get("quick"):
            return [
                "",
                "No tuning (the quick variant): every cell uses the base config's epochs and learning "
                "rates. Read its numbers as a smoke test, not as a ranking.",
            ]
        return [
            "",
            "No tuning protocol (no `sweep.protocol`): every cell uses the base config's epochs and "
            "learning rates.",
        ]
    pr = plan["protocol"]
    out = [
        "",
        "## Protocol",
        "",
        f"Epochs chosen from {pr['epochs']} for `full` at budget 1, seed {pr['seed']}; then each method's "
        f"embedding learning rate from {', '.join(f'{x:g}x' for x in pr['lr_grid'])} of its base at budget "
        f"{pr['budget']} (`full`: 1), seed {pr['seed']}; both on validation AUC and then fixed for the "
        f"method's cells (docs/compare.md)."
        + (
            f" Then the init scale of {', '.join(f'`{m}`' for m in pr['init_scale']['methods'])} from "
            f"{', '.join(f'{x:g}x' for x in pr['init_scale']['grid'])}, at that learning rate, the same way."
            if pr.get("init_scale") else ""
        )
        + f" Recorded in `{PROTOCOL_FILE}`.",
    ]
    if proto is None:
        return out + ["", "Not chosen yet: the tuning cells have not finished."]
    if not proto.get("complete"):
        out += [
            "",
            "**The tuning is not complete**: the reported cells wait for it (run the same command again).",
        ]
    for g, rec in (proto.get("epochs") or {}).items():
        cands = ", ".join(f"{c['epochs']}: {_f(c.get('valid_auc'))}" for c in rec.get("candidates", []))
        out += [
            "",
            f"{g}: epochs **{rec.get('chosen') or '—'}** (valid AUC by epochs: {cands})"
            + (f"; {rec['note']}" if rec.get("note") else ""),
        ]
    for g, per in (proto.get("lr") or {}).items():
        out += _factor_table(f"Embedding learning rate, {g}", pr["lr_grid"], per, "chosen LR", "chosen_lr")
    init = pr.get("init_scale")
    for g, per in (proto.get("init_scale") or {}).items():
        out += _factor_table(
            f"Init scale (`embedding.init_scale`) of {', '.join(f'`{m}`' for m in init['methods'])}, {g}, at "
            "the chosen learning rate",
            init["grid"], per, "chosen scale", "chosen_init",
        )
    return out


def _factor_table(title: str, grid: list[float], per: dict[str, Any], head: str, key: str) -> list[str]:
    out = [
        "",
        f"{title} (valid AUC per factor; chosen in bold):",
        "",
        "| method | tuned at | " + " | ".join(f"{x:g}x" for x in grid) + f" | {head} |",
        "| --- | --- |" + " ---: |" * len(grid) + " ---: |",
    ]
    for m, rec in per.items():
        by = {c["factor"]: c for c in rec.get("candidates", [])}
        texts = []
        for f in grid:
            c = by.get(f)
            t = "—" if c is None else (_f(c.get("valid_auc")) if c["state"] == "done" else c["state"])
            texts.append(f"**{t}**" if rec.get("chosen_factor") == f and c and c["state"] == "done" else t)
        tuned = ", ".join(dict.fromkeys(c["budget"] for c in rec.get("candidates", [])))
        chosen = f"{rec[key]:g}" if rec.get(key) is not None else "—"
        out.append(
            f"| {m} | {tuned} | "
            + " | ".join(texts)
            + f" | {chosen}"
            + (f" ({rec['note']})" if rec.get("note") else "")
            + " |"
        )
    return out


def _f(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not math.isnan(v) else "—"


def render_markdown(
    df: pd.DataFrame,
    plan: dict[str, Any],
    plots: dict[tuple[str, str], list[Path]],
    proto: dict[str, Any] | None = None,
) -> str:
    methods = [m for m in plan.get("methods", []) if m in set(df["method_label"])] or list(
        dict.fromkeys(df["method_label"])
    )
    budgets = [b for b in plan.get("budgets", []) if b in set(df["budget"])] or list(
        dict.fromkeys(df["budget"])
    )
    counts = df["status"].value_counts().to_dict()
    split = (
        df["eval_split"].dropna().iloc[0] if "eval_split" in df and df["eval_split"].notna().any() else "eval"
    )
    seeds = sorted({int(s) for s in df["seed"].dropna()})
    reference = plan.get("reference") or "hash"
    quick = f" — **{quick_label(plan, seeds)}**" if plan.get("quick") else ""
    n_seeds = len(seeds)
    tq = f"t = {t_quantile(n_seeds - 1):.2f} for n = {n_seeds}" if n_seeds > 1 else "none with one seed"
    out = [
        f"# Comparison `{plan.get('name', '')}`{quick}",
        "",
        f"Source: `{plan.get('source') or '?'}`{' (--quick)' if plan.get('quick') else ''}. "
        f"Cells: {len(df)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}). "
        f"Seeds: {', '.join(map(str, seeds))} (n = {n_seeds} per cell unless a cell says fewer).",
        "",
        f"Metric: {split} AUC, mean ± sample std (n−1) over seeds; **bold** = best mean at that budget; "
        "≈ = a tie with the best: the paired difference with the best over the same seeds has a "
        f"{LEVEL:.0%} Student-t interval that holds 0 ({tq}). With 3 seeds the intervals are wide: "
        "methods are ranked and called tied by these paired differences, not by their means alone. "
        "Budgets are fractions of the full tables' size (Σ table rows × dim × 4 bytes) or bytes; "
        "`full` cannot compress, so it runs only at budget 1 and is the reference.",
    ]
    out += _protocol_section(proto, plan)
    agg = aggregate(df)
    groups = _groups(df)
    for g in groups:
        gdf = df[(df["model_label"] == g[0]) & (df["dataset_label"] == g[1])]
        gagg = agg[(agg["model_label"] == g[0]) & (agg["dataset_label"] == g[1])]
        out += ["", f"## {g[0]} on {g[1]}", ""]
        facts = []
        fb = pd.to_numeric(gdf["full_bytes"], errors="coerce").dropna()
        if len(fb):
            facts.append(f"full size {format_bytes(fb.iloc[0])}")
        ref = gagg[
            (gagg["method_label"].isin(gdf[gdf["method"] == "full"]["method_label"])) & (gagg["n"] > 0)
        ]
        ref = ref[ref["budget"] == "1"] if (ref["budget"] == "1").any() else ref
        if len(ref):
            facts.append(f"reference `full` at budget 1: AUC {ref['mean'].iloc[0]:.4f}")
        orc = gdf["oracle_auc"].dropna() if "oracle_auc" in gdf else pd.Series(dtype=float)
        if len(orc):
            facts.append(f"oracle AUC (true click probabilities): {orc.mean():.4f}")
        if facts:
            text = "; ".join(facts)
            out += [text[0].upper() + text[1:] + ".", ""]
        out += [_table(gdf, gagg, methods, budgets, "metric"), ""]
        pt = (
            _paired_table(gdf, methods, budgets, reference) if reference in set(gdf["method_label"]) else None
        )
        if pt is not None:
            out += [
                f"Paired difference against `{reference}` at the same budget (mean over the seeds both have "
                f"[{LEVEL:.0%} Student-t interval]; an interval that holds 0 is a tie):",
                "",
                pt,
                "",
            ]
        rk = _ranking(gdf, gagg, methods, budgets)
        if rk is not None:
            out += [
                "Ranking at each budget, by the paired difference with the best mean "
                f"[{LEVEL:.0%} interval]:",
                "",
                rk,
                "",
            ]
        out += [
            "Embedding memory (`memory_bytes()`, measured, mean over seeds):",
            "",
            _table(gdf, gagg, methods, budgets, "bytes"),
            "",
        ]
        out += _serving_section(gdf, methods, budgets)
        out += ["Train seconds (mean over seeds):", "", _table(gdf, gagg, methods, budgets, "seconds")]
        for p in plots.get(g, []):
            out += ["", f"![{p.stem}]({p.name})"]
    out += [
        "",
        "## Against the papers",
        "",
        "Each claim decided from the cells above by its paired differences (rules: docs/compare.md, "
        '"Against the papers")'
        + (f"; {quick_label(plan, seeds)}: indicative only" if plan.get("quick") else "")
        + ".",
        "",
        render_claims(evaluate_claims(df, reference)),
    ]
    bad = df[df["status"].isin(["failed", "skipped", "pending", "running"])]
    if len(bad):
        out += ["", "## Cells without a result", "", "| cell | status | reason |", "| --- | --- | --- |"]
        for _, r in bad.iterrows():
            reason = str(r["error"] or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{r['cell_id']}` | {r['status']} | {reason} |")
    return "\n".join(out) + "\n"


# ---- plots --------------------------------------------------------------------------------


def make_plots(df: pd.DataFrame, plan: dict[str, Any], sweep_dir: Path) -> dict[tuple[str, str], list[Path]]:
    """AUC against bytes and seconds against budget, with error bars (sample std over
    seeds) where a cell has more than one seed. Needs matplotlib: without it, no plots."""
    try:
        import matplotlib
    except ImportError:
        return {}

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in plan.get("methods", []) if m in set(df["method_label"])] or list(
        dict.fromkeys(df["method_label"])
    )
    groups = _groups(df)
    out: dict[tuple[str, str], list[Path]] = {}
    for g in groups:
        gdf = df[(df["model_label"] == g[0]) & (df["dataset_label"] == g[1]) & (df["status"] == "done")]
        if not len(gdf):
            continue
        sfx = _suffix(groups, g)
        title = f"{plan.get('name', '')}: {g[0]} on {g[1]}"
        if plan.get("quick"):
            title += f" — {quick_label(plan, sorted({int(x) for x in gdf['seed'].dropna()}))}"
        paths = []

        fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
        for m in methods:
            sub = gdf[gdf["method_label"] == m]
            if not len(sub):
                continue
            a = (
                sub.groupby("budget", sort=False)
                .agg(x=("embedding_bytes", "mean"), y=(METRIC, "mean"), e=(METRIC, "std"))
                .sort_values("x")
            )
            is_full = (sub["method"] == "full").all()
            if is_full:
                ax.axhline(a["y"].iloc[-1], color="black", ls="--", lw=1, label=f"{m} (reference)")
            ax.errorbar(
                a["x"],
                a["y"],
                yerr=a["e"].fillna(0),
                marker="s" if is_full else "o",
                ms=5,
                capsize=3,
                label=None if is_full else m,
                color="black" if is_full else None,
                ls="none" if is_full else "-",
            )
        if "oracle_auc" in gdf and gdf["oracle_auc"].notna().any():
            ax.axhline(
                gdf["oracle_auc"].mean(),
                color="tab:gray",
                ls=":",
                lw=1.5,
                label="oracle (true probabilities)",
            )
        ax.set_xscale("log")
        ax.set_xlabel("embedding memory, bytes (measured, log scale)")
        ax.set_ylabel(f"{METRIC.upper()} ({gdf['eval_split'].iloc[0] if 'eval_split' in gdf else 'eval'})")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = sweep_dir / f"auc_vs_bytes{sfx}.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)

        fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
        ticks: dict[float, str] = {}
        for m in methods:
            sub = gdf[gdf["method_label"] == m]
            xb = pd.to_numeric(sub["budget_bytes"], errors="coerce")
            if not len(sub) or xb.isna().all():
                continue
            sub = sub.assign(xb=xb)
            a = (
                sub.groupby("budget", sort=False)
                .agg(x=("xb", "mean"), y=("train_seconds", "mean"), e=("train_seconds", "std"))
                .sort_values("x")
            )
            ticks.update({float(x): b for b, x in a["x"].items()})
            ax.errorbar(a["x"], a["y"], yerr=a["e"].fillna(0), marker="o", ms=5, capsize=3, label=m)
        ax.set_xscale("log")
        if ticks:
            ax.set_xticks(list(ticks), [ticks[k] for k in ticks])
            ax.minorticks_off()
        ax.set_xlabel("budget (fraction of the full tables, or bytes; log scale)")
        ax.set_ylabel("train seconds")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = sweep_dir / f"time_vs_budget{sfx}.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
        out[g] = paths
    return out


def build_report(sweep_dir: str | Path) -> dict[str, Any]:
    """Rebuild results files, report.md and plots from the cell directories."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such comparison directory")
    _, plan = _cells(sweep_dir)
    df = collect_results(sweep_dir)
    files = write_results(df, sweep_dir)
    plots = make_plots(df, plan, sweep_dir)
    report = sweep_dir / "report.md"
    report.write_text(render_markdown(df, plan, plots, read_json(sweep_dir / PROTOCOL_FILE)))
    return {
        "results": str(files[0]),
        "results_csv": str(files[1]),
        "report": str(report),
        "plots": [str(p) for ps in plots.values() for p in ps],
    }
