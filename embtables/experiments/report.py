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

from embtables.experiments.jsonfile import read_json
from embtables.experiments.sweep import CELL_FILE, PLAN_FILE, STATUS_FILE, SUMMARY_FILE, cell_state

METRIC = "auc"
META_COLUMNS = ["cell_id", "method_label", "method", "knobs", "budget", "budget_fraction", "budget_bytes",
                "full_bytes", "seed", "model_label", "dataset_label", "status", "error", "error_type", "min_bytes",
                "attempts", "cell_seconds"]


# ---- results ------------------------------------------------------------------------------


def _cells(sweep_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    plan = read_json(sweep_dir / PLAN_FILE)
    if plan is not None:
        return plan["cells"], plan
    metas = [read_json(p) for p in sorted(sweep_dir.glob(f"*/{CELL_FILE}"))]
    metas = [m for m in metas if m]
    if not metas:
        raise FileNotFoundError(f"{sweep_dir}: no {PLAN_FILE} and no */{CELL_FILE}: not a comparison directory")
    methods = list(dict.fromkeys(m["method_label"] for m in metas))
    # largest budget first: fractions by value, then byte budgets by size
    size = {m["budget"]: (m.get("budget_fraction") or 0, m.get("budget_bytes") or 0) for m in metas}
    budgets = sorted(size, key=lambda b: size[b], reverse=True)
    return metas, {"name": sweep_dir.name, "methods": methods, "budgets": budgets}


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
        row.update(status=cell_state(cdir), error=st.get("error"), error_type=st.get("error_type"),
                   min_bytes=st.get("min_bytes"), attempts=st.get("attempts"), cell_seconds=st.get("seconds"))
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
            kinds = {type(v) for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1:
                df[col] = df[col].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
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
    agg = pd.DataFrame({
        "mean": g[metric].mean(), "std": g[metric].std(ddof=1), "n": g[metric].count(),
        "bytes": g["embedding_bytes"].mean(), "seconds": g["train_seconds"].mean(),
    })
    total = df.groupby(keys, sort=False).size().rename("cells")
    out = agg.join(total, how="right").reset_index()
    out["n"] = out["n"].fillna(0).astype(int)
    return out


def fmt_mean_std(mean: float, std: float, n: int) -> str:
    if n > 1 and not math.isnan(std):
        return f"{mean:.4f} ± {std:.4f}"
    return f"{mean:.4f}"


def _empty_reason(cells: pd.DataFrame) -> str:
    from embtables.embeddings import format_bytes

    st = set(cells["status"])
    if st & {"pending", "running"}:
        return "pending"
    if st == {"skipped"}:
        return "n/a (cannot compress)"
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


def _table(df: pd.DataFrame, agg: pd.DataFrame, methods: list[str], budgets: list[str], value: str) -> str:
    """method x budget markdown table of ``value`` (metric | bytes | seconds)."""
    from embtables.embeddings import format_bytes

    best: dict[str, float] = {}
    if value == "metric":
        for b in budgets:
            col = agg[(agg["budget"] == b) & (agg["n"] > 0)]["mean"]
            if len(col):
                best[b] = col.max()
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
            elif value == "bytes":
                text = format_bytes(r["bytes"])
            else:
                text = f"{r['seconds']:.1f}"
            if int(r["n"]) < int(r["cells"]):
                text += f" ({int(r['n'])}/{int(r['cells'])} seeds)"
            cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _groups(df: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(df["model_label"], df["dataset_label"], strict=True)))


def _suffix(groups: list[tuple[str, str]], g: tuple[str, str]) -> str:
    return "" if len(groups) == 1 else f"_{g[0]}_{g[1]}"


def render_markdown(df: pd.DataFrame, plan: dict[str, Any], plots: dict[tuple[str, str], list[Path]]) -> str:
    from embtables.embeddings import format_bytes

    methods = [m for m in plan.get("methods", []) if m in set(df["method_label"])] or list(
        dict.fromkeys(df["method_label"]))
    budgets = [b for b in plan.get("budgets", []) if b in set(df["budget"])] or list(dict.fromkeys(df["budget"]))
    counts = df["status"].value_counts().to_dict()
    split = df["eval_split"].dropna().iloc[0] if "eval_split" in df and df["eval_split"].notna().any() else "eval"
    seeds = sorted({int(s) for s in df["seed"].dropna()})
    out = [
        f"# Comparison `{plan.get('name', '')}`",
        "",
        f"Source: `{plan.get('source') or '?'}`{' (--quick)' if plan.get('quick') else ''}. "
        f"Cells: {len(df)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}). "
        f"Seeds: {', '.join(map(str, seeds))}.",
        "",
        f"Metric: {split} AUC, mean ± sample std (n−1) over seeds; **bold** = best mean at that budget. "
        "Budgets are fractions of the full tables' size (Σ table rows × dim × 4 bytes) or bytes; "
        "`full` cannot compress, so it runs only at budget 1 and is the reference.",
    ]
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
        ref = gagg[(gagg["method_label"].isin(gdf[gdf["method"] == "full"]["method_label"])) & (gagg["n"] > 0)]
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
        out += ["Embedding memory (`memory_bytes()`, measured, mean over seeds):", "",
                _table(gdf, gagg, methods, budgets, "bytes"), ""]
        out += ["Train seconds (mean over seeds):", "", _table(gdf, gagg, methods, budgets, "seconds")]
        for p in plots.get(g, []):
            out += ["", f"![{p.stem}]({p.name})"]
    bad = df[df["status"].isin(["failed", "skipped", "pending", "running"])]
    if len(bad):
        out += ["", "## Cells without a result", "", "| cell | status | reason |", "| --- | --- | --- |"]
        for _, r in bad.iterrows():
            reason = str(r["error"] or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{r['cell_id']}` | {r['status']} | {reason} |")
    return "\n".join(out) + "\n"


# ---- plots --------------------------------------------------------------------------------


def make_plots(df: pd.DataFrame, plan: dict[str, Any], sweep_dir: Path) -> dict[tuple[str, str], list[Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in plan.get("methods", []) if m in set(df["method_label"])] or list(
        dict.fromkeys(df["method_label"]))
    groups = _groups(df)
    out: dict[tuple[str, str], list[Path]] = {}
    for g in groups:
        gdf = df[(df["model_label"] == g[0]) & (df["dataset_label"] == g[1]) & (df["status"] == "done")]
        if not len(gdf):
            continue
        sfx = _suffix(groups, g)
        title = f"{plan.get('name', '')}: {g[0]} on {g[1]}"
        paths = []

        fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
        for m in methods:
            sub = gdf[gdf["method_label"] == m]
            if not len(sub):
                continue
            a = sub.groupby("budget", sort=False).agg(x=("embedding_bytes", "mean"), y=(METRIC, "mean"),
                                                      e=(METRIC, "std")).sort_values("x")
            is_full = (sub["method"] == "full").all()
            if is_full:
                ax.axhline(a["y"].iloc[-1], color="black", ls="--", lw=1, label=f"{m} (reference)")
            ax.errorbar(a["x"], a["y"], yerr=a["e"].fillna(0), marker="s" if is_full else "o", ms=5, capsize=3,
                        label=None if is_full else m, color="black" if is_full else None,
                        ls="none" if is_full else "-")
        if "oracle_auc" in gdf and gdf["oracle_auc"].notna().any():
            ax.axhline(gdf["oracle_auc"].mean(), color="tab:gray", ls=":", lw=1.5, label="oracle (true probabilities)")
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
            a = sub.groupby("budget", sort=False).agg(x=("xb", "mean"), y=("train_seconds", "mean"),
                                                      e=("train_seconds", "std")).sort_values("x")
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
    report.write_text(render_markdown(df, plan, plots))
    return {"results": str(files[0]), "results_csv": str(files[1]), "report": str(report),
            "plots": [str(p) for ps in plots.values() for p in ps]}
