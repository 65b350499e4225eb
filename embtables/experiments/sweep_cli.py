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
    skipped = sum(c.skip_reason is not None for c in plan.cells)
    threads = args.threads or default_threads(args.jobs)
    print(f"== compare {plan.name}: {len(plan.cells)} cells ({len(plan.method_labels)} methods, "
          f"{len(plan.budgets)} budgets; {skipped} not run by design), jobs={args.jobs}, threads/job={threads}"
          f"\n== directory: {sweep_dir}")
    if args.dry_run:
        for c in plan.cells:
            print(f"  {c.cell_id}" + (f"  (skip: {c.skip_reason})" if c.skip_reason else ""))
        return 0
    out = run_sweep(plan, sweep_dir, jobs=args.jobs, threads=threads, retry_failed=not args.keep_failed,
                    progress=not args.quiet)
    print(f"== {out['ran']} cells ran ({out['done']} ok, {out['failed']} failed), "
          f"{out['already_finished']} already finished or not run by design")
    print(f"== report: {out['report']}\n== results: {out['results']}, {out['results_csv']}")
    for p in out["plots"]:
        print(f"== plot: {p}")
    return 1 if out["failed"] and args.strict else 0


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
        "compare", help="memory-budget comparison: every method at every budget (a table and plots)",
        description="Run every (method, budget, seed[, model, dataset]) cell of a comparison file as one run in "
                    "SWEEP_DIR/<cell-id>/. Rerunning skips finished cells; failed cells are recorded and retried.")
    c.add_argument("config", help="comparison file (YAML with a sweep: section) or shipped name, "
                                  "e.g. budget-synth-criteo")
    c.add_argument("--quick", action="store_true", help="apply the file's sweep.quick section (fewer cells, less data)")
    c.add_argument("--jobs", type=positive_int, default=1,
                   help="cells run at once, each in its own process (default 1)")
    c.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per cell (default: cores / jobs)")
    c.add_argument("--sweep-dir", default=None, help="directory of the comparison (default runs/<name>[-quick])")
    c.add_argument("--methods", default=None, help="comma-separated method labels or names to keep")
    c.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a value of the base config for every cell")
    c.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    c.add_argument("--keep-failed", action="store_true", help="do not retry cells that failed before")
    c.add_argument("--strict", action="store_true", help="exit 1 if any cell failed")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=_cmd_compare)

    r = subparsers.add_parser("report", help="rebuild a comparison's results table, report.md and plots")
    r.add_argument("sweep_dir", help="directory written by `embtables compare`")
    r.add_argument("--quiet", action="store_true", help="do not print the report")
    r.set_defaults(fn=_cmd_report)
