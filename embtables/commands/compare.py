"""``embtables compare CONFIG.yaml`` and ``embtables report SWEEP_DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from embtables.argtypes import positive_int


def _cmd_compare(args: argparse.Namespace) -> int:
    from embtables.experiments.sweep import default_sweep_dir, default_threads, run_sweep
    from embtables.experiments.sweep_config import load_sweep

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    plan = load_sweep(args.config, args.set, quick=args.quick, methods=methods)
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else default_sweep_dir(plan)
    threads = args.threads or default_threads(args.jobs)
    label = (
        f" (quick: {len(plan.seeds)} seed{'s' if len(plan.seeds) != 1 else ''}, smoke test)"
        if plan.quick
        else ""
    )
    print(
        f"== compare {plan.name}{label}: {len(plan.method_labels)} methods, "
        f"{len(plan.budgets)} budget{'s' if len(plan.budgets) != 1 else ''}, "
        f"{len(plan.seeds)} seed{'s' if len(plan.seeds) != 1 else ''}; jobs={args.jobs}, "
        f"threads/job={threads}\n== directory: {sweep_dir}"
    )
    if plan.protocol is None:
        skipped = sum(c.skip_reason is not None for c in plan.cells)
        print(
            f"== {len(plan.cells)} cells ({skipped} not run by design); "
            "no tuning: the base config's epochs and LR"
        )
        if args.dry_run:
            for c in plan.cells:
                print(f"  {c.cell_id}" + (f"  (skip: {c.skip_reason})" if c.skip_reason else ""))
            return 0
    else:
        if args.dry_run:
            _print_protocol_plan(plan)
            return 0
        pr = plan.protocol
        print(
            f"== protocol: epochs from {list(pr.epochs)} for full, "
            f"embedding LR x {list(pr.lr_grid_text)} per "
            f"method at budget {pr.budget.label}, seed {pr.seed}, on validation AUC (docs/compare.md)"
        )
    out = run_sweep(
        plan,
        sweep_dir,
        jobs=args.jobs,
        threads=threads,
        retry_failed=not args.keep_failed,
        progress=not args.quiet,
    )
    print(
        f"== {out['ran']} cells ran ({out['done']} ok, {out['failed']} failed), "
        f"{out['already_finished']} already finished or not run by design"
        + ("" if out["protocol_complete"] else "; the protocol's tuning is not complete (see above)")
    )
    print(f"== report: {out['report']}\n== results: {out['results']}, {out['results_csv']}")
    for p in out["plots"]:
        print(f"== plot: {p}")
    return 1 if (out["failed"] and args.strict) or not out["protocol_complete"] and args.strict else 0


def _print_protocol_plan(plan) -> None:
    """The three stages: stage 1's cells by id; the later ones by count (their epochs and
    LR, hence their ids, are chosen by the stages before)."""
    pr = plan.protocol
    ep = plan.epoch_cells()
    lr_n = sum(len(plan.lr_factors(a.method)) for a in plan.axes)
    grid = plan.build_cells()
    skipped = sum(c.skip_reason is not None for c in grid)
    reused = len(
        {
            (a.method.label, plan._group(a.dataset, a.model))
            for a in plan.axes
            if pr.budget.label in {b.label for b in plan.budgets} and pr.seed in plan.seeds
        }
    )
    init_axes = [a for a in plan.axes if pr.tunes_init(a.method)]
    init_n = len(init_axes) * (len(pr.init_factors) - 1)  # factor 1 is the method's LR cell
    n = 4 if init_axes else 3
    print(
        f"== stage 1/{n}, epochs: {len(ep)} cells "
        f"(`full` at budget 1, seed {pr.seed}, epochs {list(pr.epochs)})"
    )
    for c in ep:
        print(f"  {c.cell_id}")
    print(
        f"== stage 2/{n}, learning rates: {lr_n} cells ({len(plan.axes)} methods x factors "
        f"{list(pr.lr_grid_text)} of the base embedding LR at budget {pr.budget.label} (`full`: 1), seed "
        f"{pr.seed}, the chosen epochs; a method without tables runs 1x only; `full`'s cell with factor 1 is "
        "a stage-1 cell when the chosen epochs are its)"
    )
    if init_axes:
        print(
            f"== stage 3/{n}, init scales: {init_n} cells ({', '.join(a.method.label for a in init_axes)} x "
            f"factors {[f'{f:g}x' for f in pr.init_factors if f != 1]} of embedding.init_scale at its chosen "
            "LR; factor 1 is its stage-2 cell)"
        )
    print(
        f"== stage {n}/{n}, reported: {len(grid)} cells ({skipped} not run by design; {reused} of them are "
        f"tuning cells, those with the chosen settings at budget {pr.budget.label}, seed {pr.seed})"
    )
    full_dup = len(plan.groups) if any(a.method.name == "full" for a in plan.axes) else 0
    print(
        f"== at most {len(ep) + lr_n + init_n - full_dup + len(grid) - skipped - reused} cells train; "
        "each trains for the chosen "
        f"epochs ({'/'.join(map(str, pr.epochs))})"
    )


def _cmd_report(args: argparse.Namespace) -> int:
    from embtables.experiments.report import build_report

    out = build_report(args.sweep_dir)
    print(Path(out["report"]).read_text() if not args.quiet else "", end="")
    print(f"== report: {out['report']}\n== results: {out['results']}, {out['results_csv']}")
    for p in out["plots"]:
        print(f"== plot: {p}")
    return 0


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    c = subparsers.add_parser(
        "compare",
        help="memory-budget comparison: every method at every budget (a table and plots)",
        description="Run every (method, budget, seed[, model, dataset]) cell of a comparison file "
        "as one run in "
        "SWEEP_DIR/<cell-id>/. Rerunning skips finished cells; failed cells are recorded and retried.",
    )
    c.add_argument(
        "config",
        help="comparison file (YAML with a sweep: section) or shipped name, e.g. budget-synth-criteo",
    )
    c.add_argument(
        "--quick", action="store_true", help="apply the file's sweep.quick section (fewer cells, less data)"
    )
    c.add_argument(
        "--jobs", type=positive_int, default=1, help="cells run at once, each in its own process (default 1)"
    )
    c.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads per cell (default: cores / jobs)"
    )
    c.add_argument(
        "--sweep-dir", default=None, help="directory of the comparison (default runs/<name>[-quick])"
    )
    c.add_argument("--methods", default=None, help="comma-separated method labels or names to keep")
    c.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a value of the base config for every cell",
    )
    c.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    c.add_argument("--keep-failed", action="store_true", help="do not retry cells that failed before")
    c.add_argument("--strict", action="store_true", help="exit 1 if any cell failed")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=_cmd_compare)

    r = subparsers.add_parser("report", help="rebuild a comparison's results table, report.md and plots")
    r.add_argument("sweep_dir", help="directory written by `embtables compare`")
    r.add_argument("--quiet", action="store_true", help="do not print the report")
    r.set_defaults(fn=_cmd_report)
