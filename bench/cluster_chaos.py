"""Chaos on a 3-node RabbitMQ cluster: kill -9 the node leading the update queue, mid-run.

    python -m bench.cluster_chaos                 # 2 leader kills + 1 aggregator kill (~4 min)
    python -m bench.cluster_chaos --kills 1       # one leader kill
    DSSGD_CLUSTER_PORTS=17200 python -m bench.cluster_chaos   # base of the 100 ports it uses

A private 3-node cluster (``testing.rabbit_cluster``: own epmd, node names, ports, data, `+S 1:1`)
and a private Redis (AOF, appendfsync always) are started here; the shared servers on 5672/6379
are never touched. Synthetic participants (integer updates, exact float32 sums) and one
aggregator are given every node in one URL (``amqp://guest:guest@h:p1,h:p2,h:p3/%2F``); the
update queue is a quorum queue replicated on the three nodes (``queue_replicas=3``).

Each round: find the queue's leader, SIGKILL that node's Erlang VM, measure the time until the
global version moves again (recovery) and until every participant has had an update confirmed
again, then start the node again (it rejoins from its own data) and let it settle. One
aggregator SIGKILL lands between rounds. At the end the exact-sum oracle of bench.chaos checks
that every confirmed update was applied exactly once (lost 0, doubled 0) and that w and stat
equal the float32 sums byte for byte. Exit 0 all good, 1 a check failed, 3 could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import connect as amqp_connect

from bench import chaos
from bench.chaos import (
    PROGRESS_TIMEOUT,
    PrivateRedis,
    Result,
    Run,
    Services,
    SetupError,
    table,
    time_until,
)
from testing.rabbit_cluster import ClusterError, RabbitCluster, reap_orphans

BASE_PORT = int(os.environ.get("DSSGD_CLUSTER_PORTS", "17200"))


class ClusterServices(Services):
    """bench.chaos's services with the broker swapped for a 3-node cluster."""

    def __init__(self, base: Path, base_port: int) -> None:
        self.base = base
        # Redis takes a port of the range too (+40..+49), so nothing of ours lands elsewhere.
        chaos.PORT_RANGE = chaos.PORT_RANGE or f"{base_port + 40}-{base_port + 49}"
        self.redis = PrivateRedis(base)
        self.rabbit = None
        self.fallback = ""
        self.cluster = RabbitCluster(base_port, base / "cluster")
        self.cluster_start_s = 0.0

    def start(self) -> None:
        self.redis.start()
        try:
            self.cluster_start_s = self.cluster.start()
        except ClusterError as exc:
            raise SetupError(f"cannot start the 3-node cluster: {exc}") from exc

    @property
    def amqp_url(self) -> str:
        return self.cluster.url

    def close(self) -> None:
        self.cluster.close()
        self.redis.stop()


def _members(svc: ClusterServices, run: Run) -> tuple[str, list[str]]:
    info = svc.cluster.queue_info(run.names.queue)
    return str(info.get("leader")), [str(m) for m in info.get("members", [])]  # type: ignore[union-attr]


def _default_members(svc: ClusterServices) -> list[str]:
    """Members of a quorum queue declared with the default arguments (queue_replicas=0)."""
    qname = f"dssgd-cluster-chaos-default-{os.getpid()}"
    conn = amqp_connect(svc.amqp_url, "dssgd-cluster-chaos", heartbeat=0)
    try:
        ch = conn.channel()
        ch.queue_declare(qname, durable=True, arguments=AmqpNames.queue_arguments(10, None, 1))
        members = svc.cluster.queue_info(qname).get("members", [])
        ch.queue_delete(qname)
    finally:
        conn.close()
    return [str(m) for m in members]  # type: ignore[union-attr]


def _leader_round(svc: ClusterServices, run: Run, res: Result, settle: float) -> None:
    leader, members = _members(svc, run)
    if len(members) != 3:
        res.problems.append(f"queue has {len(members)} members ({members}), not 3")
    t_kill = time.monotonic()
    svc.cluster.kill9(leader)
    res.faults += 1
    v0 = run.version()
    offsets = run.record_offsets()
    recovered = time_until(lambda: run.version() > v0, t_kill)
    res.recovered(recovered, f"kill -9 of leader {leader}")
    everyone = time_until(lambda: run.version() > v0 and run.confirmed_since(offsets), t_kill)

    def new_leader() -> bool:
        now, _ = _members(svc, run)
        return now not in ("", leader, "None")

    elected = time_until(new_leader, t_kill, interval=0.2)
    t_restart = time.monotonic()
    svc.cluster.start_node(leader)
    rejoin = time.monotonic() - t_restart
    fmt = lambda s: "never" if s is None else f"{s:.1f} s"  # noqa: E731
    res.notes.append(f"kill -9 {leader} (leader): applying again after {fmt(recovered)}, every "
                     f"participant confirmed again after {fmt(everyone)}, new leader seen by "
                     f"the CLI after {fmt(elected)}; node back and rejoined in {rejoin:.1f} s")
    if everyone is None:
        res.problems.append(f"not every participant resumed within {PROGRESS_TIMEOUT:.0f} s")
    time.sleep(settle)


def scenario_cluster(svc: ClusterServices, kills: int, settle: float, rng: random.Random,
                     res: Result) -> None:
    res.notes.append(f"a queue declared with the default arguments (queue_replicas 0) has "
                     f"members {_default_members(svc)}")
    with svc.run("cluster", pace=0.05, queue_replicas=3) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        leader, members = _members(svc, run)
        res.notes.append(f"queue {run.names.queue}: leader {leader}, members {members}")
        for i in range(kills):
            time.sleep(settle + rng.uniform(0.0, 1.0))
            _leader_round(svc, run, res, settle)
            if i == 0:  # one aggregator process killed too, mid-run, between the broker faults
                time.sleep(rng.uniform(0.0, 1.5))
                run.kill_aggregator()
                run.start_aggregator()
                t_end = time.monotonic()
                res.faults += 1
                v0 = run.version()
                res.recovered(time_until(lambda v0=v0: run.version() > v0, t_end),
                              "aggregator kill")
        time.sleep(settle)
        run.finish(res)


class Interrupted(BaseException):
    pass


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=2, help="leader kills (default 2)")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds of undisturbed traffic between faults (default 3)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the fault timing")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    with contextlib.suppress(OSError):  # workers die with the bench (bench.chaos._die_with_parent)
        chaos._LIBC = ctypes.CDLL(None, use_errno=True)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    for pid in reap_orphans():
        print(f"[cluster-chaos] killed pid {pid}, left by an earlier bench", flush=True)
    base = Path(tempfile.mkdtemp(prefix="dssgd-cluster-chaos-"))
    (base / "cluster").mkdir()
    svc = ClusterServices(base, BASE_PORT)
    res = Result("leader-kill")
    t0 = time.monotonic()
    try:
        svc.start()
        print(f"[cluster-chaos] {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC, {platform.node()}, "
              f"{os.cpu_count()} cores, seed {seed}; RabbitMQ {svc.cluster.version} x3 "
              f"({svc.cluster.url.split('@')[1]}) formed in {svc.cluster_start_s:.0f} s; "
              f"private Redis {svc.redis.version} on {svc.redis.port}; work dir {base}",
              flush=True)
        scenario_cluster(svc, args.kills, args.settle, random.Random(seed), res)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"[cluster-chaos] interrupted ({exc})", file=sys.stderr)
        return 130
    except (SetupError, ClusterError) as exc:
        print(f"[cluster-chaos] cannot run: {exc}", file=sys.stderr)
        return 3
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(ClusterError, OSError):
            svc.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    res.seconds = time.monotonic() - t0
    print()
    print(table([res]))
    print(f"\nrecovery = from the kill to the next increase of the global version; "
          f"total {res.seconds:.0f} s")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
