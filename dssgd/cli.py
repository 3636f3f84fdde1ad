"""The ``dssgd`` command line: parse (``dssgd/parser.py``), then hand over to one command module.

Shared option helpers live in ``dssgd/options.py`` and the error → exit-code mapping in
``dssgd/entry.py``, so no command module needs to import this one.
"""

from __future__ import annotations

import argparse

from dssgd.entry import run_command
from dssgd.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, _dispatch)


def _dispatch(args: argparse.Namespace) -> int | None:
    """The command's module, imported only when it runs (each pulls in different libraries)."""
    if args.command == "run":
        from dssgd.orchestrate import cmd_run

        return cmd_run(args)
    if args.command in ("aggregator", "worker", "provision"):
        from dssgd import services

        return getattr(services, f"cmd_{args.command}")(args)
    if args.command == "share-server":
        from dssgd.secure_cmd import cmd_share_server

        return cmd_share_server(args)
    if args.command == "experiment":
        from dssgd.experiment import cmd_experiment

        return cmd_experiment(args)
    if args.command in ("plot", "export", "eval"):
        from dssgd import results

        return getattr(results, f"cmd_{args.command}")(args)
    if args.command in ("status", "runs", "delete"):
        from dssgd import status

        return getattr(status, f"cmd_{args.command}")(args)
    if args.command == "audit":
        from dssgd.audit.command import cmd_audit

        return cmd_audit(args)
    if args.command == "dead-letters":
        from dssgd.deadletters import cmd_dead_letters

        return cmd_dead_letters(args)
    if args.command == "deprovision":
        from dssgd.admin import cmd_deprovision

        return cmd_deprovision(args)
    return None
