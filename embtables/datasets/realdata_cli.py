"""`embtables data frappe | amazon | ml1m-implicit`: converters of public benchmark files
(see docs/real-data.md for where to obtain each)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _ctr_summary(schema, out: Path) -> str:
    rows = ", ".join(f"{k} {v:,}" for k, v in schema.rows.items())
    feats = ", ".join(f"{c.name} ({c.cardinality:,})" for c in schema.categorical)
    return f"wrote {out}: {rows} rows\ncategorical: {feats}"


def _run(fn, *args, **kw) -> int:
    try:
        print(fn(*args, **kw))
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _frappe(args: argparse.Namespace) -> int:
    from embtables.datasets.frappe import convert_frappe

    return _run(
        lambda: _ctr_summary(
            convert_frappe(
                args.src, args.out, negatives=args.negatives, seed=args.seed, overwrite=args.overwrite
            ),
            args.out,
        )
    )


def _ml1m(args: argparse.Namespace) -> int:
    from embtables.datasets.ml1m import convert_ml1m

    return _run(
        lambda: _ctr_summary(
            convert_ml1m(
                args.src,
                args.out,
                valid_frac=args.valid_frac,
                negatives=args.negatives,
                seed=args.seed,
                overwrite=args.overwrite,
            ),
            args.out,
        )
    )


def _amazon(args: argparse.Namespace) -> int:
    from embtables.datasets.amazon import convert_amazon
    from embtables.datasets.seq_cli import _sample_config, _summary

    def go() -> str:
        out = convert_amazon(
            args.src,
            args.out,
            attributes=args.attributes,
            category=args.category,
            cfg=_sample_config(args, args.mode or "sampled", "all"),
            name=args.name,
            overwrite=args.overwrite,
        )
        return _summary(out)

    return _run(go)


def add_realdata_commands(data_subparsers: argparse._SubParsersAction) -> None:
    from embtables.datasets.seq_cli import _sample_args

    p = data_subparsers.add_parser(
        "frappe",
        help="Frappe -> the BARS Frappe_x1 CTR protocol (official valid/test, train rebuilt from the log)",
    )
    p.add_argument(
        "src", type=Path, help="folder with valid.libsvm, test.libsvm and Mobile_Frappe.zip (or frappe.csv)"
    )
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    p.add_argument(
        "--negatives", type=int, default=2, help="train negatives per positive (the benchmark's 2)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train negatives and the train row order")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_frappe)

    p = data_subparsers.add_parser(
        "amazon",
        help="S3-Rec's Amazon sequences (NAME.txt + NAME_item2attributes.json) -> behaviour sequences",
    )
    p.add_argument("src", type=Path, help="NAME.txt: 'user item1 item2 ...' per line, in time order")
    p.add_argument(
        "--attributes", type=Path, default=None, help="NAME_item2attributes.json (item -> attribute ids)"
    )
    p.add_argument(
        "--category",
        choices=["rarest", "first"],
        default="rarest",
        help="which attribute is the item's category: the rarest (most specific, default) or the first",
    )
    _sample_args(p, None)
    p.set_defaults(func=_amazon)

    p = data_subparsers.add_parser(
        "ml1m-implicit",
        help="MovieLens-1M implicit train/test pairs + users.dat/movies.dat -> CTR with negatives",
    )
    p.add_argument("src", type=Path, help="folder with train.txt, test.txt, users.dat, movies.dat")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    p.add_argument(
        "--valid-frac", type=float, default=0.1, help="share of each user's train pairs for validation"
    )
    p.add_argument("--negatives", type=int, default=1, help="sampled negatives per positive in every split")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the validation carve, the negatives and the order"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_ml1m)
