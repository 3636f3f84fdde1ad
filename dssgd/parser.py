"""The ``dssgd`` argument parser: one small function per sub-command.

Kept apart from the dispatch in ``dssgd/cli.py`` so a forked service child can parse its own
command line without importing every command module.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from dssgd import deadletters
from dssgd.admin import add_admin_parsers, add_management_option, add_provision_options
from dssgd.audit.options import add_audit_parser
from dssgd.options import add_connection_options, add_run_options, env_int

EPILOG = """\
examples:
  dssgd run                                  # 10 participants × 600 MNIST images, MLP, async
  dssgd run --order round-robin --epochs 10  # the paper's most accurate order
  dssgd run --model cnn --theta-u 0.01 --target-accuracy 0.97 --time-limit 600
  dssgd status --watch                       # where the latest run stands
  dssgd aggregator --run-id r1 & dssgd worker --run-id r1 --claim 5   # services on their own

RabbitMQ and Redis are found through --amqp-url/--redis-url or DSSGD_AMQP_URL/DSSGD_REDIS_URL.
"""


def _run_parser(sub: Any) -> None:
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
    p.add_argument(
        "--aggregator-ingest",
        type=int,
        default=0,
        metavar="K",
        help="run the aggregator scaled out: K ingest processes (participant p mod K each) "
        "feeding one applier, exactly once under crashes; see `dssgd aggregator --help`, "
        "--ingest. Default 0: one aggregator process",
    )
    add_run_options(p)
    add_connection_options(p)


def _scale_out_options(p: Any) -> None:
    p.add_argument(
        "--ingest",
        type=int,
        default=env_int("DSSGD_AGGREGATOR_INGEST") or 0,
        metavar="K",
        help="scale out: split the aggregator into K ingest processes and one applier. "
        "Participant p goes to partition p mod K (its own queue); each ingest decodes, "
        "validates and dedups its participants' updates and pre-sums a batch; the applier adds "
        "the batches and commits them, and an ingest acks a batch only after that commit, so "
        "every update is applied exactly once even if any one process is killed. Worth it when "
        "the aggregator's CPU is the limit and there are cores to spare: about one ingest per "
        "free core (measured on 2 cores: 1.7× the one-process rate at θu 0.01, 5× at θu 0.1;"
        " docs/BENCHMARKS.md). Async runs without --defence or --stat-decay only. Default 0: "
        "one process does all (env DSSGD_AGGREGATOR_INGEST)",
    )
    p.add_argument(
        "--part",
        metavar="applier|I",
        help="with --ingest K: run only this part (the applier, or ingest I of 0..K-1), to place "
        "the parts on several machines or under a process manager; by default this process "
        "is the applier and starts (and restarts) the K ingests itself",
    )


def _aggregator_parser(sub: Any) -> None:
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
    _scale_out_options(p)
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
        default=env_int("DSSGD_METRICS_PORT"),
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


def _worker_parser(sub: Any) -> None:
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


def _provision_parser(sub: Any) -> None:
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
    add_provision_options(p)
    add_connection_options(p)


def _status_parser(sub: Any) -> None:
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


def _plot_parser(sub: Any) -> None:
    p = sub.add_parser("plot", help="PNG of a run's accuracy against time, updates and bytes")
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--out", help="PNG path (default runs/RUN/accuracy.png)")
    p.add_argument("--runs-dir", default=os.environ.get("DSSGD_RUNS_DIR", "runs"))
    add_connection_options(p)


def _export_parser(sub: Any) -> None:
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


def _eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="test accuracy of a run's global model (or an exported file)")
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--from-file", metavar="FILE", help="evaluate this exported state dict instead")
    p.add_argument("--json", action="store_true")
    add_connection_options(p)


def _experiment_parser(sub: Any) -> None:
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


def _runs_parser(sub: Any) -> None:
    p = sub.add_parser("runs", help="list the runs stored in Redis")
    p.add_argument("--json", action="store_true")
    add_connection_options(p)


def _delete_parser(sub: Any) -> None:
    p = sub.add_parser("delete", help="remove a run's keys, queues and users")
    p.add_argument("run_id", metavar="RUN")
    add_management_option(p)
    add_connection_options(p)


def _share_server_parser(sub: Any) -> None:
    from dssgd.secure_cmd import add_share_server_parser  # --secure two-server

    add_share_server_parser(sub)


_SUB_PARSERS = (
    _run_parser,
    _aggregator_parser,
    _worker_parser,
    _provision_parser,
    _status_parser,
    _plot_parser,
    _export_parser,
    _eval_parser,
    _experiment_parser,
    _runs_parser,
    _delete_parser,
    _share_server_parser,
    add_audit_parser,
    deadletters.add_parser,
)


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
    for add in _SUB_PARSERS:
        add(sub)
    add_admin_parsers(sub)
    return parser
