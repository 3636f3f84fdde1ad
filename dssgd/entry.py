"""Parse a ``dssgd`` command line, run one command, and turn user mistakes into exit codes.

User mistakes (bad options, unreachable services, missing data) end with a one-line message and
exit code 2 (or 69 for an unreachable service), never a traceback. Shared by the CLI and by the
fork launcher's service children, which must not import the CLI (it imports the launcher).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dssgd.admin import EXIT_DENIED, AccessDenied, where
from dssgd.options import connections
from dssgd.parser import build_parser
from dssgd.shared.errors import (
    BrokerError,
    ConfigError,
    DataError,
    DssgdError,
    StoreError,
    is_permanent,
)
from dssgd.shared.lifecycle import EXIT_ERROR, EXIT_UNAVAILABLE, EXIT_USAGE, setup_logging

# A command's function, or None when this dispatcher does not know the command.
Dispatch = Callable[[argparse.Namespace], "int | None"]


def run_command(argv: list[str] | None, dispatch: Dispatch) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, name=args.command)
    code = guarded(args, dispatch)
    if code is None:
        parser.error(f"unknown command {args.command}")
        return EXIT_USAGE
    return code


def guarded(args: argparse.Namespace, dispatch: Dispatch) -> int | None:
    """Run the command; a user's mistake or an unreachable service becomes one line and a code."""
    try:
        return dispatch(args)
    except (BrokerError, StoreError) as exc:
        print(f"dssgd: {exc}{_where(args, exc)}", file=sys.stderr)
        if is_permanent(exc):
            return EXIT_DENIED  # rights or password: retrying cannot help
        if "deploy/dev.sh" not in str(exc):
            print(
                "dssgd: is the service running? `bash deploy/dev.sh services` starts both locally.",
                file=sys.stderr,
            )
        return EXIT_UNAVAILABLE
    except OSError as exc:  # a path we were given: unwritable, a directory, a full disk
        print(f"dssgd: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, DataError) as exc:
        print(f"dssgd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DssgdError as exc:
        print(f"dssgd: {exc}", file=sys.stderr)
        return EXIT_DENIED if isinstance(exc, AccessDenied) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _where(args: argparse.Namespace, exc: Exception) -> str:
    """Name the server an error came from when its message does not already."""
    if not hasattr(args, "redis_url") or "connecting to" in str(exc) or " at " in str(exc):
        return ""
    conns = connections(args)
    if isinstance(exc, StoreError):
        return f" (Redis at {where(conns.redis_url, 6379)})"
    return f" (RabbitMQ at {where(conns.amqp_url, 5672)})"
