"""`embtables data ...` commands: ``synth`` and ``criteo`` (wired into `embtables/cli.py`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embtables.argtypes import nonnegative_int, positive_float, positive_int


def _fractions(text: str) -> tuple[float, ...]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--split expects fractions like 0.8,0.1,0.1, got {text!r}") from e
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"--split needs 3 non-negative fractions summing to 1, got {text!r}")
    return parts


def _summary(schema) -> str:
    lines = [f"wrote {schema.name}: " + ", ".join(f"{k} {v:,} rows" for k, v in schema.rows.items())]
    card = sum(c.cardinality for c in schema.categorical)
    lines.append(f"categorical: {len(schema.categorical)} features, sum of distinct ids {card:,}")
    for key in ("oracle_auc", "ctr"):
        if key in schema.extra:
            values = ", ".join(f"{k} {v:.4f}" for k, v in schema.extra[key].items() if v is not None)
            lines.append(f"{key}: " + values)
    bad = schema.extra.get("bad_rows")
    if bad is not None:
        lines.append("bad rows skipped: " + (", ".join(f"{k} {v:,}" for k, v in bad.items()) or "none"))
    return "\n".join(lines)


def _run_synth(args: argparse.Namespace) -> int:
    from embtables.datasets.synth import generate_synth

    schema = generate_synth(args.out, args.rows, seed=args.seed, scale=args.scale, split=args.split,
                            tsv=args.tsv, overwrite=args.overwrite, progress=not args.quiet)
    print(_summary(schema))
    if args.tsv:
        print(f"wrote the same rows as Criteo TSV: {args.tsv}")
    return 0


def _run_criteo(args: argparse.Namespace) -> int:
    from embtables.datasets.criteo import BadRowError, CriteoOptions, convert_criteo

    by_file = any(x is not None for x in (args.train, args.valid, args.test))
    if by_file and args.src:
        print("error: give either SRC files (split by fraction) or --train/--valid/--test files, not both",
              file=sys.stderr)
        return 2
    if not by_file and not args.src:
        print("error: no input files (give SRC... or --train/--valid/--test)", file=sys.stderr)
        return 2
    sources = ({"train": args.train or [], "valid": args.valid or [], "test": args.test or []} if by_file
               else list(args.src))
    options = CriteoOptions(
        cat_mode=args.cat_mode, min_count=args.min_count, vocab_from=args.vocab_from,
        dense_transform=args.dense_transform, split=args.split, random_split=args.random_split,
        seed=args.seed, on_bad_row=args.on_bad_row, overwrite=args.overwrite, progress=not args.quiet,
        name=args.name, block_mb=args.block_mb, workers=args.workers)
    try:
        schema = convert_criteo(sources, args.out, options)
    except BadRowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary(schema))
    return 0


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="create datasets (Parquet + schema.json)")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synth", help="synthetic Criteo-style data with a planted model (stores true `prob`)")
    p.add_argument("--rows", type=positive_int, default=1_000_000, help="rows in total (default 1,000,000)")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--scale", type=positive_float, default=0.05,
                   help="multiplies the Criteo Kaggle cardinalities (features under 2,000 ids keep theirs); "
                        "default 0.05")
    p.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1),
                   help="train,valid,test fractions (sequential)")
    p.add_argument("--tsv", type=Path, default=None,
                   help="also write the same rows as an official Criteo TSV (no header; .gz -> gzip)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_synth)

    p = sub.add_parser("criteo", help="convert Criteo TSV (Kaggle, Terabyte), header CSV or Kaggle's "
                                      "Id,Label,... CSV to Parquet")
    p.add_argument("src", nargs="*", type=Path,
                   help="input files, split by --split fractions (or --random-split)")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    p.add_argument("--train", nargs="+", type=Path, help="files for the train split (split by file)")
    p.add_argument("--valid", nargs="+", type=Path, help="files for the valid split")
    p.add_argument("--test", nargs="+", type=Path, help="files for the test split")
    p.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1),
                   help="train,valid,test fractions of SRC rows; sequential tail unless --random-split")
    p.add_argument("--random-split", action="store_true", help="assign rows to splits at random (seeded)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of --random-split")
    p.add_argument("--cat-mode", choices=["raw", "vocab"], default="vocab",
                   help="raw: hex value as int64 (missing -> 0); vocab: ids by frequency (default)")
    p.add_argument("--min-count", type=positive_int, default=1,
                   help="vocab mode: values seen fewer times -> OOV id")
    p.add_argument("--vocab-from", type=Path, default=None,
                   help="vocab mode: reuse the vocabulary of another converted dataset directory")
    p.add_argument("--dense-transform", choices=["log1p", "none"], default="log1p",
                   help="log1p: missing/negative -> 0 then log1p (DLRM); none: missing -> 0 only")
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error",
                   help="error: stop at the first bad row (file, line, text); "
                        "skip: drop and count per reason")
    p.add_argument("--name", default=None, help="dataset name in schema.json (default: criteo)")
    p.add_argument("--block-mb", type=positive_float, default=16.0, help="bytes parsed per block (MB)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="blocks parsed at once, one thread each (default 1: one block at a time, "
                        "parsed by pyarrow's threads)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_criteo)

    from embtables.datasets.seq_cli import add_sequence_data_commands

    add_sequence_data_commands(sub)  # movielens, behavior, synth-seq

    from embtables.datasets.realdata_cli import add_realdata_commands

    add_realdata_commands(sub)  # frappe, amazon, ml1m-implicit
