"""The ``dssgd`` command line: one parser, thin subcommands that wire settings → objects → run.

User mistakes (bad options, unreachable services, missing data) end with a one-line message and
exit code 2 (or 69 for an unreachable service), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from shared.config import (
    DOWNLOADS,
    ORDERS,
    PRESETS,
    VALUE_CODINGS,
    Connections,
    RunConfig,
    env_overrides,
    from_mapping,
)
from shared.errors import (
    BrokerError,
    ConfigError,
    DataError,
    DssgdError,
    StoreError,
    is_permanent,
)
from shared.lifecycle import EXIT_ERROR, EXIT_UNAVAILABLE, EXIT_USAGE, setup_logging
from shared.rules import rules_help
from shared.selection import selection_help

log = logging.getLogger("dssgd")

EPILOG = """\
examples:
  dssgd run                                  # 10 participants × 600 MNIST images, MLP, async
  dssgd run --order round-robin --epochs 10  # the paper's most accurate order
  dssgd run --model cnn --theta-u 0.01 --target-accuracy 0.97 --time-limit 600
  dssgd status --watch                       # where the latest run stands
  dssgd aggregator --run-id r1 & dssgd worker --run-id r1 --claim 5   # services on their own

RabbitMQ and Redis are found through --amqp-url/--redis-url or DSSGD_AMQP_URL/DSSGD_REDIS_URL.
"""

# (flag, RunConfig field, type, help)
RUN_OPTIONS: list[tuple[str, str, Any, str]] = [
    (
        "--task",
        "task",
        str,
        "what to train: FILE.py:NAME, package.module:NAME, or a registered name "
        "(mnist-mlp, the default; mnist-cnn; breast-cancer); see docs/TASKS.md",
    ),
    ("--model", "model", str, "mlp or cnn: the same as --task mnist-mlp / mnist-cnn"),
    ("--participants", "participants", int, "number of participants N (default 10)"),
    ("--shard-size", "shard_size", int, "training images per participant (default 600)"),
    ("--label-skew", "label_skew", float, "non-IID shards: Dirichlet α of the label mix"),
    ("--theta-u", "theta_u", float, "fraction of Δw uploaded per epoch, θu (default 0.1)"),
    ("--theta-d", "theta_d", float, "fraction of parameters downloaded per epoch, θd (default 1)"),
    ("--download", "download", str, f"which θd fraction: {', '.join(DOWNLOADS)}"),
    ("--selection", "selection", str, selection_help()),
    ("--lr", "lr", float, "local SGD learning rate (default 0.2)"),
    ("--batch-size", "batch_size", int, "local mini-batch size (default 32)"),
    ("--gamma", "gamma", float, "bound γ on each shared value (default lr/4)"),
    ("--tau", "tau", float, "threshold τ for --selection threshold (default γ/10)"),
    ("--order", "order", str, f"{', '.join(ORDERS)} (default async)"),
    ("--rule", "rule", str, rules_help()),
    ("--staleness-exponent", "staleness_exponent", float, "a in the weight (1+staleness)^-a"),
    ("--stat-decay", "stat_decay", float, "the paper's β: stat := β·stat per update (1 = off)"),
    (
        "--value-coding",
        "value_coding",
        str,
        f"wire precision of values: {', '.join(VALUE_CODINGS)}",
    ),
    ("--epochs", "epochs", int, "local epochs per participant (default 30, 0 = unlimited)"),
    ("--seed", "seed", int, "seed of initialisation, shards and shuffles (default 1)"),
    ("--data", "data", str, "data source: auto, hub, or a directory (MNIST IDX files, task data)"),
    ("--eval-interval", "eval_interval", float, "seconds between test-set evaluations"),
    ("--max-staleness", "max_staleness", int, "refuse updates older than this many versions"),
    ("--max-l2", "max_l2", float, "server-side L2 bound per update (larger ones are scaled down)"),
    ("--rate-limit", "rate_limit", float, "max updates per second per participant (server-side)"),
    ("--queue-max-length", "queue_max_length", int, "backlog bound of the update queue"),
    (
        "--dp-eps-per-value",
        "dp_eps_per_value",
        float,
        "differential privacy with the sparse vector "
        "technique: ε per shared value (the paper's ε/c); off by default",
    ),
    ("--dp-budget", "dp_budget", float, "total ε a participant may spend before it stops"),
    ("--dp-delta", "dp_delta", float, "δ of the reported (ε, δ) bound (default 1e-5)"),
    ("--dp-mechanism", "dp_mechanism", str, "svt (the paper's, default) or dpsgd (record-level)"),
    ("--dp-epsilon", "dp_epsilon", float, "DP-SGD: total ε per participant for the whole run"),
    ("--dp-clip", "dp_clip", float, "DP-SGD: per-example gradient clip norm C (default 1)"),
    (
        "--dp-noise-multiplier",
        "dp_noise_multiplier",
        float,
        "DP-SGD: noise multiplier σ (default: derived from --dp-epsilon, --dp-delta, --epochs)",
    ),
]


def add_connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("services")
    g.add_argument("--amqp-url", help="RabbitMQ URL (env DSSGD_AMQP_URL; default local guest)")
    g.add_argument("--redis-url", help="Redis URL (env DSSGD_REDIS_URL; default local)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training run (stored with the run; every process uses the same)")
    g.add_argument("--config", metavar="FILE", help="TOML file with any of these settings")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named set of hyper-parameters; 'paper' = lr 0.001, batch 1, γ 0.001, τ 0.0001",
    )
    for flag, field_name, tp, help_text in RUN_OPTIONS:
        g.add_argument(
            flag,
            dest=field_name,
            type=tp,
            metavar=field_name.upper().replace("_", "-") if tp is not str else None,
            help=help_text,
        )


def run_config_from_args(args: argparse.Namespace, run_id: str) -> RunConfig:
    """defaults < preset < config file < environment < flags."""
    values: dict[str, Any] = {}
    values.update(PRESETS.get(args.preset or "default", {}))
    if args.config:
        from dssgd.admin import read_toml, split_run_command_options

        values.update(read_toml(args.config))
        split_run_command_options(values, args)
        if "preset" in values:
            values = {**PRESETS.get(values.pop("preset"), {}), **values}
    values.update(env_overrides(RunConfig))
    values.pop("run_id", None)
    values.pop("created", None)
    for _, field_name, _, _ in RUN_OPTIONS:
        v = getattr(args, field_name, None)
        if v is not None:
            values[field_name] = v
    values["run_id"] = run_id
    return from_mapping(RunConfig, values, "run configuration")


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    return int(raw) if raw and raw.isdigit() else None


def connections(args: argparse.Namespace) -> Connections:
    return Connections.from_env(args.amqp_url, args.redis_url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dssgd",
        description="Distributed Selective SGD (Shokri & Shmatikov, CCS 2015) over RabbitMQ and "
        "Redis: participants train locally and share a selected fraction of their updates.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "run",
        help="train locally: the aggregator and the participants as local processes",
        description="Run a whole training on this machine: starts the aggregator "
        "and the participants (forked from this process, or under supervisord with "
        "--launcher supervisor), shows progress, stops on the first "
        "stop condition and prints a final table.",
    )
    p.add_argument("--run-id", help="name of the run (default: run-<date>-<time>)")
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes hosting the participants (default: number of CPU cores)",
    )
    p.add_argument(
        "--target-accuracy", type=float, help="stop when the global test accuracy reaches this"
    )
    p.add_argument("--time-limit", type=float, help="stop after this many seconds (default 900)")
    p.add_argument(
        "--runs-dir",
        help="where run folders (supervisor config, logs) go (env DSSGD_RUNS_DIR; default ./runs)",
    )
    p.add_argument("--resume", action="store_true", help="continue an existing run of that id")
    p.add_argument(
        "--launcher",
        choices=("fork", "supervisor"),
        help="how the services start: forked from this process after it has imported PyTorch "
        "once (default on Linux, fastest start), or as fresh processes under supervisord "
        "(default elsewhere)",
    )
    p.add_argument("--json", action="store_true", help="print the final table as JSON")
    add_run_options(p)
    add_connection_options(p)

    p = sub.add_parser(
        "aggregator",
        help="the aggregator service on its own",
        description="Consume updates of a run and apply them to the global "
        "parameters in Redis. Creates the run from the given options if it does "
        "not exist yet.",
    )
    p.add_argument("--run-id", default=os.environ.get("DSSGD_RUN_ID", "default"))
    p.add_argument("--prefetch", type=int, default=1000)
    p.add_argument("--max-batch", type=int, default=500, help="updates per Redis commit at most")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate the global model")
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="keep running (metrics, health) after the run is over; by default the aggregator "
        "exits with a summary once every participant finished or the run was stopped",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="health check: exit 0 if an aggregator of this run has reported within 15 s",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_env_int("DSSGD_METRICS_PORT"),
        help="serve Prometheus metrics on this port (0 = any free port)",
    )
    p.add_argument(
        "--metrics-addr",
        default=os.environ.get("DSSGD_METRICS_ADDR", "127.0.0.1"),
        help="address for the metrics endpoint (0.0.0.0 in a container)",
    )
    p.add_argument(
        "--credentials",
        metavar="FILE",
        help="aggregator.json from `dssgd provision`: "
        "least-privilege users and the participants' HMAC keys (then every update must "
        "be authenticated)",
    )
    add_run_options(p)
    add_connection_options(p)

    p = sub.add_parser(
        "worker",
        help="a worker hosting one or more participants",
        description="Host participants of a run. Either name them (--participants "
        "0,1,2 or --slot I/W for every p with p mod W == I) or claim free ids "
        "from Redis (--claim K, the default claims one).",
    )
    p.add_argument("--run-id", default=os.environ.get("DSSGD_RUN_ID", "default"))
    p.add_argument("--participants", help="comma-separated participant ids")
    p.add_argument("--slot", help="I/W: host the participants p with p %% W == I")
    p.add_argument(
        "--claim",
        type=int,
        default=int(os.environ.get("DSSGD_CLAIM", "1")),
        help="claim this many free participant ids (default 1)",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="send small integer updates instead of training (exact-sum test oracle)",
    )
    p.add_argument(
        "--task", help="this worker's copy of the run's task (FILE.py:NAME, …); default: the run's"
    )
    p.add_argument(
        "--data", metavar="DIR", help="this worker's own data folder, handed to local_data(ctx)"
    )
    p.add_argument("--record-dir", help="synthetic mode: write confirmed updates here")
    p.add_argument(
        "--pace",
        type=float,
        default=0.0,
        help="minimum seconds between two epochs of one participant",
    )
    p.add_argument(
        "--check", action="store_true", help="health check: exit 0 if Redis and RabbitMQ answer"
    )
    p.add_argument(
        "--credentials",
        metavar="FILE",
        help="p<N>.json from `dssgd provision`: run, "
        "participant id, least-privilege URLs and the HMAC key",
    )
    p.add_argument(
        "--worker-id",
        default=os.environ.get("DSSGD_WORKER_ID"),
        help="stable name of this worker: a restart with the same name gets its participants "
        "back (default: supervisor's process name, else host:pid)",
    )
    add_connection_options(p)

    p = sub.add_parser(
        "provision",
        help="least-privilege users and keys for a run",
        description="Create one RabbitMQ user per participant (may publish only "
        "its own routing key, with a verified user_id), Redis ACL users (read-only "
        "on the parameters), an aggregator user, and HMAC keys; write credential "
        "files (mode 0600). Needs the RabbitMQ management API.",
    )
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--participants", type=int, required=True, help="number of participants N")
    p.add_argument(
        "--out", help="directory for the credential files (default runs/RUN/credentials)"
    )
    p.add_argument("--runs-dir", default=os.environ.get("DSSGD_RUNS_DIR", "runs"))
    p.add_argument(
        "--management-url",
        help="RabbitMQ management API (default http://<amqp "
        "host>:15672, admin credentials from --amqp-url)",
    )
    from dssgd.admin import add_provision_options

    add_provision_options(p)
    add_connection_options(p)

    p = sub.add_parser(
        "status",
        help="where a run stands",
        description="Version, updates, queue depth, accuracy and per-participant "
        "progress of a run (the latest one by default).",
    )
    p.add_argument("--run-id", help="run to show (default: the most recently created)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    add_connection_options(p)

    p = sub.add_parser("plot", help="PNG of a run's accuracy against time, updates and bytes")
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--out", help="PNG path (default runs/RUN/accuracy.png)")
    p.add_argument("--runs-dir", default=os.environ.get("DSSGD_RUNS_DIR", "runs"))
    add_connection_options(p)

    p = sub.add_parser(
        "export",
        help="write a run's global model as a PyTorch state dict",
        description="Write the global parameters of RUN as a state dict that "
        "loads into the plain model class: "
        "model = shared.models.build_model(NAME); model.load_state_dict("
        "torch.load(FILE)).",
    )
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--out", help="file (default runs/RUN/model.pt)")
    p.add_argument("--runs-dir", default=os.environ.get("DSSGD_RUNS_DIR", "runs"))
    add_connection_options(p)

    p = sub.add_parser("eval", help="test accuracy of a run's global model (or an exported file)")
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--from-file", metavar="FILE", help="evaluate this exported state dict instead")
    p.add_argument("--json", action="store_true")
    add_connection_options(p)

    p = sub.add_parser(
        "experiment",
        help="regenerate the paper's results table",
        description="Run the baselines and DSSGD (through RabbitMQ and Redis) "
        "for the paper's settings and write RESULTS.md with plots.",
    )
    p.add_argument("name", choices=["paper"], help="the experiment to run")
    p.add_argument(
        "--preset",
        choices=["quick", "full", "smoke"],
        default="quick",
        help="quick: N=20, about 15 min on 2 cores; full: the paper's N=150; "
        "smoke: a few seconds, to check the set-up",
    )
    p.add_argument("--out", default="docs", help="folder for RESULTS.md and img/ (default docs)")
    p.add_argument("--runs-dir", default=os.environ.get("DSSGD_RUNS_DIR", "runs"))
    p.add_argument("--verbose", action="store_true", help="print every baseline epoch")

    p = sub.add_parser("runs", help="list the runs stored in Redis")
    p.add_argument("--json", action="store_true")
    add_connection_options(p)

    p = sub.add_parser("delete", help="remove a run's keys, queues and users")
    p.add_argument("run_id", metavar="RUN")
    from dssgd.admin import add_admin_parsers, add_management_option

    add_management_option(p)
    add_connection_options(p)
    add_admin_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, name=args.command)
    try:
        if args.command == "run":
            from dssgd.orchestrate import cmd_run

            return cmd_run(args)
        if args.command == "aggregator":
            from dssgd.services import cmd_aggregator

            return cmd_aggregator(args)
        if args.command == "worker":
            from dssgd.services import cmd_worker

            return cmd_worker(args)
        if args.command == "provision":
            from dssgd.services import cmd_provision

            return cmd_provision(args)
        if args.command == "experiment":
            from dssgd.experiment import cmd_experiment

            return cmd_experiment(args)
        if args.command in ("plot", "export", "eval"):
            from dssgd import results

            return getattr(results, f"cmd_{args.command}")(args)
        if args.command in ("status", "runs", "delete"):
            from dssgd import status

            return getattr(status, f"cmd_{args.command}")(args)
        if args.command == "deprovision":
            from dssgd.admin import cmd_deprovision

            return cmd_deprovision(args)
    except (BrokerError, StoreError) as exc:
        from dssgd.admin import EXIT_DENIED

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
        from dssgd.admin import EXIT_DENIED, AccessDenied

        print(f"dssgd: {exc}", file=sys.stderr)
        return EXIT_DENIED if isinstance(exc, AccessDenied) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _where(args: argparse.Namespace, exc: Exception) -> str:
    """Name the server an error came from when its message does not already."""
    from dssgd.admin import where

    if not hasattr(args, "redis_url") or "connecting to" in str(exc) or " at " in str(exc):
        return ""
    conns = connections(args)
    if isinstance(exc, StoreError):
        return f" (Redis at {where(conns.redis_url, 6379)})"
    return f" (RabbitMQ at {where(conns.amqp_url, 5672)})"


def parse_participants(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ConfigError(
            f"--participants must be comma-separated integers, got {text!r}"
        ) from None


def parse_slot(slot: str) -> tuple[int, int]:
    try:
        i, w = (int(x) for x in slot.split("/"))
    except ValueError:
        raise ConfigError(f"--slot must look like I/W (for example 0/2), got {slot!r}") from None
    if not 0 <= i < w:
        raise ConfigError(f"--slot {slot}: need 0 <= I < W")
    return i, w


def runs_dir(args: argparse.Namespace) -> Path:
    return Path(args.runs_dir)
