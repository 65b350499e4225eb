"""Subcommands of the `embtables` command that sit on several layers (`size` reads a
dataset's schema and sizes a method; `plan` plans a YAML config's sharding; `compare` and
`report` run and report a comparison). Each module
has ``register_commands(subparsers)`` and imports its implementation only when the
subcommand runs, so `embtables --help` loads no torch. Part of the cli layer."""
