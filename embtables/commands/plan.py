"""`embtables plan CONFIG`: the sharding plan and memory per rank, offline."""

from __future__ import annotations

import argparse

from embtables.argtypes import positive_int
from embtables.embeddings.budget import size_arg


def register_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="plan sharding/offload for a config offline (no GPUs or data needed, only schema.json)"
    )
    p.add_argument("config", help="YAML file or shipped config name (e.g. criteo-terabyte)")
    p.add_argument("--world-size", type=positive_int,
                   help="ranks (GPUs) to plan for (default: sharding.world_size)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="compute device (default: sharding.device)")
    p.add_argument("--hbm", type=size_arg,
                   help="memory per GPU, e.g. 80GiB (default: sharding.hbm_per_device)")
    p.add_argument("--host-memory", type=size_arg,
                   help="host memory per machine, e.g. 1TiB (default: sharding.host_memory)")
    p.add_argument("--offload", choices=["none", "uvm", "uvm_caching"], help="GPU tables in host memory")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from embtables.experiments.planning import plan_config
    from embtables.sharding.plan import format_report

    rep = plan_config(args.config, args.set, world_size=args.world_size, device=args.device, hbm=args.hbm,
                      host_memory=args.host_memory, offload=args.offload)
    print(rep.to_json() if args.json else format_report(rep))
    return 0
