"""`embtables size DATA --method M --budget B`: what a method would allocate for a dataset,
per feature, without building it (the methods' pure sizing functions).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from embtables.argtypes import table_dim
from embtables.embeddings.budget import budget_arg


def _knob(text: str) -> tuple[str, object]:
    key, sep, val = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--knob expects KEY=VALUE (e.g. rows=100000), got {text!r}")
    try:
        return key, ast.literal_eval(val)
    except (ValueError, SyntaxError):
        return key, val  # a bare word: a string knob such as operation=concat


def describe(plan, features) -> list[str]:
    """One line per feature (or per unified group) of a method's sizing plan."""
    from embtables.embeddings.budget import format_bytes

    lines = []
    if hasattr(plan, "groups"):  # unified
        for i, g in enumerate(plan.groups):
            mode = "collisionless offsets" if g.offsets is not None else "hashed"
            lines.append(f"group {i}: {len(g.features)} features, tables of {list(g.table_rows)} rows x "
                         f"{plan.probe_dim}, {mode}")
    elif hasattr(plan, "radices"):  # qr
        for f, r in zip(features, plan.radices, strict=True):
            what = "plain" if not r else " x ".join(str(x) for x in r[::-1]) + f" (radix {r[0]})"
            lines.append(f"{f.name:<16}{f.cardinality:>14,}  {what}")
    else:  # full, hash, mch
        ident = getattr(plan, "identity", None)
        for i, (f, r) in enumerate(zip(features, plan.rows, strict=True)):
            tag = "  identity" if ident is not None and ident[i] else ""
            lines.append(f"{f.name:<16}{f.cardinality:>14,}  {r:>12,} rows{tag}")
    lines.append(f"total: {format_bytes(plan.bytes)} ({plan.bytes:,} bytes), "
                 f"{plan.num_parameters:,} parameters")
    return lines


def _run_plan(args: argparse.Namespace) -> int:
    from embtables.datasets.schema import load_schema
    from embtables.embeddings import features_from_schema, full_bytes, plan

    schema = load_schema(args.data)
    feats = features_from_schema(schema)
    p = plan(feats, args.method, dim=args.dim, budget=args.budget, dtype=args.dtype, **dict(args.knob))
    print(f"{args.method} on {schema.name}: {len(feats)} features, dim {args.dim}, {args.dtype}, "
          f"budget {args.budget} (full fp32 size {full_bytes(feats, args.dim):,} bytes)")
    print("\n".join(describe(p, feats)))
    return 0


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "size", help="size an embedding method for a dataset and budget (builds nothing)")
    p.add_argument("data", type=Path, help="dataset directory (schema.json)")
    p.add_argument("--method", required=True, help="embedding method (see `embtables list`)")
    p.add_argument("--budget", type=budget_arg, default=None,
                   help="fraction of the full size, a number in (0, 1] (1, 0.1, 1/16), or bytes (4MiB)")
    p.add_argument("--dim", type=table_dim, default=16, help="output width per feature (multiple of 4)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--knob", type=_knob, action="append", default=[], metavar="KEY=VALUE",
                   help="a method knob, repeatable (e.g. --knob operation=concat --knob partitions=3)")
    p.set_defaults(func=_run_plan)
