"""The `embtables` command."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from embtables.argtypes import positive_int
from embtables.logs import quiet_libraries


def _cmd_run(args: argparse.Namespace) -> int:
    if args.config is None and args.resume is None and args.from_run is None:
        raise SystemExit("embtables run: give a CONFIG (file or shipped name), --resume RUN_DIR "
                         "or --from RUN_DIR")
    extra = {"overwrite": args.overwrite, "from_run": args.from_run, "stage": args.stage}
    try:
        if args.nproc and args.nproc > 1:
            from embtables.experiments.launch_run import launch_run

            return launch_run(args.config, args.set, args.run_dir, args.resume, args.nproc, **extra)
        from embtables.experiments.runner import run

        run(args.config, overrides=args.set, run_dir=args.run_dir, resume=args.resume, **extra)
    except KeyboardInterrupt as e:  # stopped after a checkpoint: the runner said how to resume
        if getattr(e, "exit_code", None) is None:
            raise
        return e.exit_code  # 143 for SIGTERM (128 + 15), 130 for Ctrl-C
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from embtables.experiments.predict import predict

    predict(args.run_dir, args.data, args.out, split=args.split)
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from embtables.doctor import main

    return main()


def _cmd_list(args: argparse.Namespace) -> int:
    from embtables.embeddings import list_methods, method_knobs
    from embtables.experiments.config import shipped_configs
    from embtables.models import list_models

    print("methods:", ", ".join(f"{m} ({', '.join(method_knobs(m)) or 'no knobs'})" for m in list_methods()))
    print("models: ", ", ".join(list_models()))
    print("configs:", ", ".join(shipped_configs()))
    print("comparisons:", ", ".join(shipped_configs("compare")))
    return 0


def _check_types(parser: argparse.ArgumentParser, **types) -> None:
    """Options by dest -> a checking type from embtables.argtypes (its error names the flag)."""
    for action in parser._actions:
        if action.dest in types:
            action.type = types[action.dest]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embtables", description="Memory-efficient embedding tables on TorchRec")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train and evaluate one experiment")
    r.add_argument("config", nargs="?", help="YAML file or shipped config name (e.g. quickstart)")
    r.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value")
    r.add_argument("--run-dir", help="write here instead of runs/<name>-<timestamp>/")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    r.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (gloo on CPU, NCCL on GPU)")
    r.add_argument("--overwrite", action="store_true",
                   help="--run-dir exists: move it aside to RUN_DIR.old-<stamp> and start afresh")
    r.add_argument("--from", dest="from_run", metavar="RUN_DIR",
                   help="start a NEW run directory from RUN_DIR's finished stages "
                        "(with --stage; RUN_DIR is only read)")
    r.add_argument("--stage", help="with --from: the stage the new run starts at (e.g. search for OptEmbed)")
    r.set_defaults(fn=_cmd_run)
    _check_types(r, nproc=positive_int)

    pr = sub.add_parser("predict", help="score a dataset with a trained run or an exported artefact")
    pr.add_argument("run_dir")
    pr.add_argument("data", help="dataset directory (schema.json)")
    pr.add_argument("--out", required=True, help="Parquet file of row ids and probabilities")
    pr.add_argument("--split", default=None, help="split to score (default: every split)")
    pr.set_defaults(fn=_cmd_predict)

    d = sub.add_parser("doctor", help="versions, device, and whether FBGEMM loads")
    d.set_defaults(fn=_cmd_doctor)
    ls = sub.add_parser("list", help="embedding methods, models and shipped configs")
    ls.set_defaults(fn=_cmd_list)

    # Areas register their own commands.
    for module in ("embtables.datasets.cli", "embtables.commands.size", "embtables.commands.plan",
                   "embtables.commands.compare", "embtables.commands.export"):
        try:
            mod = __import__(module, fromlist=["register_commands"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        fn = getattr(args, "fn", None) or args.func  # areas' subcommands use either name
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BrokenPipeError:  # `embtables list | head`: the reader is gone, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        return _report_error(e, args.debug, argv)


def _report_error(e: BaseException, debug: bool, argv: list[str] | None) -> int:
    """One clear line; a traceback only with --debug, else in a log file named on a second line
    when the error is not a plain user mistake."""
    from embtables.errors import describe, is_user_error, needs_log, one_line, write_log

    if debug:
        traceback.print_exception(e)
    message = describe(e)
    user = is_user_error(e)
    print(f"error: {message if user and 'Traceback' not in message else one_line(message)}", file=sys.stderr)
    if not debug and needs_log(e):
        log = write_log(e, argv)
        if log is not None:
            print(f"(full traceback in {log}; `embtables --debug ...` prints it)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
