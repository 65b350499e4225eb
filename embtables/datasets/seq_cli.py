"""`embtables data movielens | behavior | synth-seq`: behaviour-sequence datasets.

``add_sequence_data_commands(data_subparsers)`` adds them to the ``data`` parent that
``embtables.datasets.cli.register_commands`` creates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embtables.argtypes import finite_float, fraction_below_one, nonnegative_int, positive_float, positive_int


def _sample_args(p: argparse.ArgumentParser, default_mode: str | None) -> None:
    g = p.add_argument_group("samples (see embtables.datasets.sequences)")
    g.add_argument("--mode", choices=["sampled", "threshold"], default=default_mode,
                   help="sampled: every event a positive + sampled negatives (RecBole protocol); "
                        "threshold: every event a sample labelled by --threshold / the label column")
    g.add_argument("--split", choices=["loo", "time"], default="loo",
                   help="loo: per user last event -> test, previous -> valid (default); "
                        "time: global time cut")
    g.add_argument("--valid-frac", type=fraction_below_one, default=0.1,
                   help="time split: share of the latest events for valid")
    g.add_argument("--test-frac", type=fraction_below_one, default=0.1,
                   help="time split: share of the latest events for test")
    g.add_argument("--max-len", type=positive_int, default=50,
                   help="keep the most recent N history events (default 50)")
    g.add_argument("--ties", choices=["strict", "order"], default="strict",
                   help="strict: history = events with a smaller timestamp (default); "
                        "order: every event earlier in (timestamp, file row) order, RecBole's convention")
    g.add_argument("--neg-ratio", type=nonnegative_int, default=1,
                   help="sampled: negatives per training positive (default 1)")
    g.add_argument("--eval-negatives", type=positive_int, default=100,
                   help="sampled: negatives ranked with each valid/test positive (default 100)")
    g.add_argument("--history-from", choices=["all", "positive"], default=None,
                   help="threshold mode: history of all events or only clicks "
                        "(default: positive for behavior logs with labels, all for MovieLens)")
    g.add_argument("--min-history", type=nonnegative_int, default=0,
                   help="drop samples with a shorter history")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the sampled negatives")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    p.add_argument("--name", default=None, help="dataset name in schema.json")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _sample_config(args: argparse.Namespace, mode: str, history_from: str):
    from embtables.datasets.sequences import SampleConfig

    return SampleConfig(mode=mode, split=args.split, max_len=args.max_len, ties=args.ties,
                        neg_ratio=args.neg_ratio, eval_negatives=args.eval_negatives,
                        valid_frac=args.valid_frac, test_frac=args.test_frac,
                        history_from=args.history_from or history_from, min_history=args.min_history,
                        seed=args.seed)


def _summary(out: Path) -> str:
    from embtables.datasets import load_schema

    s = load_schema(out)
    rows = ", ".join(f"{k} {v:,}" for k, v in s.rows.items())
    feats = ", ".join(f"{c.name} ({c.cardinality:,})" for c in s.categorical)
    seqs = ", ".join(f"{q.name} -> {q.shares_with}" for q in s.sequences)
    return (f"wrote {out}: {rows} rows\ncategorical: {feats}\n"
            f"sequences (max_len {s.sequences[0].max_len}): {seqs}")


def _run_movielens(args: argparse.Namespace) -> int:
    from embtables.datasets.movielens import GROUPLENS_URLS, convert_movielens, download

    src = args.src
    if args.download:
        name = args.download
        dest = Path(args.download_dir or (args.out.parent / "raw"))
        try:
            src = download(name, dest, url=args.url, timeout=args.timeout)
        except ConnectionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"downloaded {args.url or GROUPLENS_URLS[name]} -> {src}")
    if src is None:
        print("error: give SRC (a MovieLens folder) or --download ml-100k|ml-1m", file=sys.stderr)
        return 2
    mode = args.mode or ("threshold" if args.threshold is not None else "sampled")
    if mode == "sampled" and args.threshold is not None:
        print("error: --threshold applies to --mode threshold (sampled mode makes every rating a positive)",
              file=sys.stderr)
        return 2
    cfg = _sample_config(args, mode, "all")
    try:
        out = convert_movielens(src, args.out, cfg=cfg, threshold=args.threshold, name=args.name,
                                overwrite=args.overwrite)
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary(out))
    return 0


def _run_behavior(args: argparse.Namespace) -> int:
    from embtables.datasets.behavior import ColumnMap, convert_behavior

    try:
        cols = ColumnMap.from_yaml(args.columns) if args.columns else ColumnMap()
        for flag, key in (("user_col", "user"), ("item_col", "item"), ("category_col", "category"),
                          ("time_col", "timestamp"), ("label_col", "label"), ("sep", "sep"),
                          ("label_threshold", "label_threshold")):
            val = getattr(args, flag)
            if val is not None:
                setattr(cols, key, None if val == "" else val)
        if args.no_header:
            cols.header = False
        mode = args.mode or ("threshold" if cols.label else "sampled")
        cfg = _sample_config(args, mode, "positive" if cols.label else "all")
        out = convert_behavior(args.src, args.out, cols=cols, cfg=cfg, name=args.name,
                               overwrite=args.overwrite)
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary(out))
    return 0


def _run_synth_seq(args: argparse.Namespace) -> int:
    from embtables.datasets.synth_seq import SynthSeqConfig, write_synth_seq

    cfg = SynthSeqConfig(rows=args.rows, num_users=args.users, num_items=args.items,
                         num_categories=args.categories, max_len=args.max_len, seed=args.seed)
    out = write_synth_seq(cfg, args.out, overwrite=args.overwrite)
    print(_summary(out))
    return 0


def add_sequence_data_commands(data_subparsers: argparse._SubParsersAction) -> None:
    p = data_subparsers.add_parser(
        "movielens",
        help="MovieLens (RecBole atomic or GroupLens ml-100k/ml-1m files) -> behaviour sequences",
        description="Defaults follow RecBole's protocol: every rating a positive, leave-one-out by time, "
                    "histories of 50, 1 training negative per positive (redrawn per epoch by the trainer), "
                    "100 negatives per valid/test positive.")
    p.add_argument("src", nargs="?", type=Path, default=None,
                   help="folder with ml-100k.inter (+.user/.item), u.data (+u.user/u.item) or ratings.dat")
    p.add_argument("--download", choices=["ml-100k", "ml-1m"], default=None,
                   help="fetch from GroupLens first")
    p.add_argument("--url", default=None, help="archive URL for --download (default: GroupLens)")
    p.add_argument("--download-dir", type=Path, default=None, help="where to unzip (default: OUT/../raw)")
    p.add_argument("--timeout", type=positive_float, default=20.0,
                   help="--download network timeout in seconds")
    p.add_argument("--threshold", type=finite_float, default=None,
                   help="rating >= T is a click (implies --mode threshold: every rating a sample)")
    _sample_args(p, None)
    p.set_defaults(func=_run_movielens)

    p = data_subparsers.add_parser(
        "behavior", help="generic (user, item, category, timestamp[, label]) logs -> behaviour sequences")
    p.add_argument("src", type=Path, help="CSV / TSV / Parquet file, one event per row")
    p.add_argument("--columns", type=Path, default=None,
                   help="YAML mapping: user, item, category, timestamp, label, sep, header")
    p.add_argument("--user-col", default=None, help="user column (default 'user')")
    p.add_argument("--item-col", default=None, help="item column (default 'item')")
    p.add_argument("--category-col", default=None, help="category column (default 'category'; '' = none)")
    p.add_argument("--time-col", default=None,
                   help="timestamp column: numbers or dates (default 'timestamp')")
    p.add_argument("--label-col", default=None, help="0/1 click column (default: none -> sampled mode)")
    p.add_argument("--label-threshold", type=finite_float, default=None, metavar="T",
                   help="labels other than 0/1 (ratings, {1, 2}): label >= T is a click "
                        "(default: labels must be 0/1)")
    p.add_argument("--sep", default=None, help="field separator (default: tab for .tsv/.txt, else comma)")
    p.add_argument("--no-header", action="store_true",
                   help="no header line: name columns by position 0, 1, ...")
    _sample_args(p, None)
    p.set_defaults(func=_run_behavior)

    p = data_subparsers.add_parser(
        "synth-seq", help="synthetic Criteo-style rows with behaviour sequences (stores prob)")
    p.add_argument("--rows", type=positive_int, default=150_000)
    p.add_argument("--users", type=positive_int, default=50_000)
    p.add_argument("--items", type=positive_int, default=5_000)
    p.add_argument("--categories", type=positive_int, default=100)
    p.add_argument("--max-len", type=positive_int, default=50)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_run_synth_seq)
