"""``embtables export RUN_DIR --dtype int8|int4|int2|fp16 --out DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from embtables.argtypes import positive_int

DTYPES = ("fp32", "fp16", "int8", "int4", "int2")  # embeddings.quantize.SERVING_DTYPES (kept torch-free here)


def _cmd_export(args: argparse.Namespace) -> int:
    from embtables.experiments.export import export_run, print_manifest

    manifest = export_run(args.run_dir, args.dtype, args.out, row_alignment=args.row_alignment,
                          program=not args.no_program, example_data=args.example_data)
    print_manifest(Path(args.out), manifest)
    return 0


def register_commands(sub) -> None:
    ex = sub.add_parser("export",
                        help="a trained run's tables quantized (TorchRec inference modules) for serving")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("--dtype", required=True, choices=DTYPES,
                    help="row-wise quantized storage of the tables (fp32: unquantized rows, same kernels)")
    ex.add_argument("--out", required=True, help="new artefact directory (must not exist)")
    ex.add_argument("--row-alignment", type=positive_int, default=16,
                    help="bytes each stored row is padded to (TorchRec's default 16; 1, 2, 4 or 8 pad less)")
    ex.add_argument("--example-data", metavar="DIR",
                    help="dataset to take the torch.export example batch from (default: the run's data)")
    ex.add_argument("--no-program", action="store_true", help="do not save a torch.export program")
    ex.set_defaults(fn=_cmd_export)
