"""Chaos on a 3-node RabbitMQ cluster: kill -9 the node leading the update queue, mid-run.

    python -m bench.cluster_chaos                 # 2 leader kills + 1 aggregator kill (~4 min)
    python -m bench.cluster_chaos --kills 1       # one leader kill
    python -m bench.cluster_chaos --combined      # + a 3-master Redis Cluster, S = 3 shards
    DSSGD_CLUSTER_PORTS=17200 python -m bench.cluster_chaos   # base of the 100 ports it uses

``--combined`` (issue 15) runs one run on the 3-node RabbitMQ cluster and a private 3-master Redis
Cluster (AOF, appendfsync always; ports base+100..102, bus base+110..112, beyond the broker's
100) with the parameters in S = 3 range shards, its run id chosen so each shard's slot is on
another master. Mid-run, one after the other: kill -9 of the RabbitMQ node leading the queue,
kill -9 of the Redis master holding shard 1 (restarted from its AOF after a second: the cluster
refuses every command meanwhile, and a commit caught between shards 2 and 1 leaves the shards
torn), kill -9 of the aggregator. Each recovery is the time from the kill until every shard's
version has moved on. The exact-sum oracle is then checked on every shard: its own applied log
(lost, doubled, versions exactly 1..V) and its range of w and stat byte for byte.

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
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import numpy as np
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.errors import DssgdError
from dssgd.shared.keys import Keys
from redis.exceptions import RedisClusterException, RedisError

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
from testing.redis_cluster import PrivateCluster

BASE_PORT = int(os.environ.get("DSSGD_CLUSTER_PORTS", "17200"))
SHARDS = 3  # --combined: range shards of the run, one per Redis master


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


class CombinedServices(ClusterServices):
    """The RabbitMQ cluster and a 3-master Redis Cluster (durable) instead of one Redis."""

    def __init__(self, base: Path, base_port: int) -> None:
        super().__init__(base, base_port)
        self.redis_port = base_port + 100
        self.redis_cluster: PrivateCluster | None = None

    def start(self) -> None:
        # Cluster bus ports at base+110..112 (not port + 10000): every port stays in our range.
        self.redis_cluster = PrivateCluster(self.redis_port, durable=True,
                                            bus_base=self.redis_port + 10)
        try:
            self.cluster_start_s = self.cluster.start()
        except ClusterError as exc:
            raise SetupError(f"cannot start the 3-node cluster: {exc}") from exc

    @property
    def redis_url(self) -> str:
        assert self.redis_cluster is not None
        return self.redis_cluster.url + "?cluster=yes"

    def close(self) -> None:
        self.cluster.close()
        if self.redis_cluster is not None:
            self.redis_cluster.stop()


def _spread_run_id(svc: CombinedServices) -> tuple[str, list[int]]:
    """A run id whose S shard tags hash to S different masters, and those masters' ports."""
    assert svc.redis_cluster is not None
    for _ in range(200):
        run_id = f"chaos-combined-{uuid.uuid4().hex[:6]}"
        keys = Keys(run_id)
        ports = [svc.redis_cluster.master_of(keys.shard(s).version).port for s in range(SHARDS)]
        if len(set(ports)) == SHARDS:
            return run_id, ports
    raise SetupError("no run id put its shards on three masters in 200 tries")


def _shard_versions(run: Run) -> list[int]:
    k = run.store.keys
    return [int(run.store.r.get(k.shard(s).version) or 0) for s in range(SHARDS)]


def _all_moved(run: Run, before: list[int]) -> Callable[[], bool]:
    def cond() -> bool:
        try:
            return all(v > b for v, b in zip(_shard_versions(run), before, strict=True))
        except (DssgdError, RedisError, RedisClusterException, OSError):
            return False  # the cluster refuses while a master is down

    return cond


def _fault(run: Run, res: Result, what: str, kill: Callable[[], None]) -> float | None:
    """Recovery = every shard's version moved on; also timed: every participant had an update
    confirmed again (a leader kill is first absorbed by what was already delivered)."""
    before = _shard_versions(run)
    offsets = run.record_offsets()
    t_kill = time.monotonic()
    kill()
    res.faults += 1
    took = time_until(_all_moved(run, before), t_kill)
    res.recovered(took, what)
    everyone = time_until(lambda: run.confirmed_since(offsets), t_kill)
    if everyone is None:
        res.problems.append(f"{what}: not every participant resumed within {PROGRESS_TIMEOUT} s")
    res.notes.append(f"{what}: every shard's version moved on {_fmt(took)} after the kill, "
                     f"every participant confirmed again after {_fmt(everyone)}")
    return took


def _fmt(s: float | None) -> str:
    return "never" if s is None else f"{s:.1f} s"


def scenario_combined(svc: CombinedServices, settle: float, rng: random.Random,
                      res: Result) -> list[str]:
    """One run, S = 3, three kinds of kill -9; returns the per-shard oracle table."""
    assert svc.redis_cluster is not None
    run_id, ports = _spread_run_id(svc)
    res.notes.append(f"shards 0, 1, 2 on the masters at ports {ports}")
    with svc.run("combined", pace=0.05, queue_replicas=3, shards=SHARDS, run_id=run_id) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        time.sleep(settle + rng.uniform(0.0, 1.0))
        leader, _ = _members(svc, run)
        _fault(run, res, f"kill -9 of RabbitMQ leader {leader}",
               lambda: svc.cluster.kill9(leader))
        svc.cluster.start_node(leader)
        time.sleep(settle + rng.uniform(0.0, 1.0))
        master = next(n for n in svc.redis_cluster.nodes if n.port == ports[1])

        def kill_master() -> None:
            master.kill()
            time.sleep(1.0)
            master.start()  # from its AOF (appendfsync always): nothing acked is lost

        _fault(run, res, f"kill -9 of Redis master :{master.port} (shard 1)", kill_master)
        time.sleep(settle + rng.uniform(0.0, 1.0))

        def kill_aggregator() -> None:
            run.kill_aggregator()
            run.start_aggregator()

        _fault(run, res, "kill -9 of the aggregator", kill_aggregator)
        time.sleep(settle)
        run.finish(res)
        return _verify_shards(run, res)


def _verify_shards(run: Run, res: Result) -> list[str]:
    """The exact-sum oracle on every shard: its own log, and its range of w and stat."""
    oracle = chaos.read_oracle(run.records, run.cfg.participants)
    layout = run.store.layout()
    _, w, stat = run.store.read_params(with_stat=True)
    assert stat is not None
    rows = ["| shard | master | version | applied | lost | doubled | versions 1..V | "
            "w, stat exact |", "|---|---|---|---|---|---|---|---|"]
    for s in range(SHARDS):
        key = run.store.keys.applied_log if s == 0 else run.store.keys.shard(s).applied_log
        log = [e.decode().split(":") for e in run.store.r.lrange(key, 0, -1)]
        counts = Counter((int(p), int(q)) for p, q, *_ in log)
        version = _shard_versions(run)[s]
        lost = len(oracle.confirmed - set(counts))
        doubled = sum(c - 1 for c in counts.values())
        in_order = sorted(int(e[2]) for e in log) == list(range(1, version + 1))
        lo, hi = layout.shard_span(s)
        w_exp, stat_exp = np.zeros(hi - lo, np.float32), np.zeros(hi - lo, np.float32)
        for key_ in counts:
            idx, vals = oracle.sent[key_]
            mine = (idx >= lo) & (idx < hi)
            w_exp[idx[mine] - lo] += vals[mine]
            stat_exp[idx[mine] - lo] += 1
        exact = (w[lo:hi].tobytes() == w_exp.tobytes()
                 and stat[lo:hi].tobytes() == stat_exp.tobytes())
        if lost or doubled or not in_order or not exact:
            res.problems.append(f"shard {s}: lost {lost}, doubled {doubled}, versions in order "
                                f"{in_order}, exact {exact}")
        master = run.svc.redis_cluster.master_of(run.store.keys.shard(s).version).port  # type: ignore[attr-defined]
        rows.append(f"| {s} | :{master} | {version} | {len(counts)} | **{lost}** | **{doubled}** "
                    f"| {'yes' if in_order else 'NO'} | {'yes' if exact else 'NO'} |")
    completed = [int(run.store.r.hget(run.store.keys.counters, "completed") or 0)]
    completed += [int(run.store.r.hget(run.store.keys.shard(s).counters, "completed") or 0)
                  for s in range(1, SHARDS)]
    res.notes.append(f"updates a shard completed after another shard had committed them "
                     f"(shards 0, 1, 2): {completed}")
    return rows


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
    ap.add_argument("--combined", action="store_true",
                    help="one run on the RabbitMQ cluster and a 3-master Redis Cluster with "
                         "S = 3 shards: kill -9 the queue leader, a Redis master, the aggregator")
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
    svc = CombinedServices(base, BASE_PORT) if args.combined else ClusterServices(base, BASE_PORT)
    res = Result("combined" if args.combined else "leader-kill")
    shard_rows: list[str] = []
    t0 = time.monotonic()
    try:
        svc.start()
        redis_desc = (f"Redis Cluster 3 masters on {BASE_PORT + 100}..{BASE_PORT + 102}"
                      if args.combined else
                      f"private Redis {svc.redis.version} on {svc.redis.port}")
        print(f"[cluster-chaos] {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC, {platform.node()}, "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, seed {seed}; RabbitMQ "
              f"{svc.cluster.version} x3 ({svc.cluster.url.split('@')[1]}) formed in "
              f"{svc.cluster_start_s:.0f} s; {redis_desc}; work dir {base}", flush=True)
        if isinstance(svc, CombinedServices):
            shard_rows = scenario_combined(svc, args.settle, random.Random(seed), res)
        else:
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
    if shard_rows:
        print("\n" + "\n".join(shard_rows))
    what = "of every shard's version" if args.combined else "of the global version"
    print(f"\nrecovery = from the kill to the next increase {what}; total {res.seconds:.0f} s")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
