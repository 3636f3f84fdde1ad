"""Chunked parameter storage (issue 15): bytes a download makes Redis send, and what commits and
downloads cost as the model grows. Every figure against a private redis-server it starts itself.

    python -m bench.storage               # full run, prints the tables
    python -m bench.storage --write-doc   # and records them in docs/BENCHMARKS.md
    python -m bench.storage --quick       # fewer repetitions

1. Bytes down: for the MLP, the CNN and a 10 M-parameter state, the bytes Redis sent
   (``INFO stats`` total_net_output_bytes) for downloads at θd = 1 and θd = 0.1, and what the
   download reported (counted on the client's socket). The negative control is the old download
   (all of w and stat, reported as θd·n·4).
2. Commit cost per update at the same k (θu = 0.01 of the 105 k MLP), 105 k against 10 M.
3. Download cost at θd = 0.1 per downloaded entry, 105 k against 10 M.

Exit code 1 if an acceptance line fails. Take timings under ``flock /work/bench.lock``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from dssgd.shared.selection import most_updated
from dssgd.shared.store import AggregatorState, RunStore, connect

from testing.redis_cluster import PrivateCluster, PrivateServer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
MARK = ("<!-- bench:storage -->", "<!-- /bench:storage -->")
PORT = 17110
BIG = 10_000_000
SMALL_K = 1_056  # θu = 0.01 of the 105,506-parameter MLP
ACCEPT_RATIO, ACCEPT_AGREE, ACCEPT_GROWTH = 0.15, 0.05, 2.0


def model_sizes() -> dict[str, int]:
    from dssgd.shared.tasks import load_task

    return {
        "MLP": load_task("mnist-mlp").layout.n,
        "CNN": load_task("mnist-cnn").layout.n,
        "10 M": BIG,
    }


def seeded(server: PrivateServer, run: str, n: int, updates: int, k: int) -> RunStore:
    """A run of n parameters with `updates` committed updates of k entries (skewed, so the
    chunk summaries differ as they do in training)."""
    store = RunStore(connect(server.url), run)
    rng = np.random.default_rng(7)
    store.init_params(rng.standard_normal(n).astype(np.float32))
    fence = store.take_fence()
    state = store.load_state()
    hot = rng.choice(n, size=max(k, n // 5), replace=False)  # a fifth of the entries, most hits
    for seq in range(1, updates + 1):
        apply_one(state, np.sort(rng.choice(hot, size=k, replace=False)), rng)
        store.commit(fence, state, {0: f"{seq}:1"}, {"applied": 1}, [])
    return store


def apply_one(state: AggregatorState, idx: np.ndarray, rng: np.random.Generator) -> None:
    state.w[idx] += rng.standard_normal(idx.size).astype(np.float32) * np.float32(0.01)
    state.stat[idx] += 1
    state.touched.append(idx)
    state.version += 1


def server_bytes(server: PrivateServer, fn: object, reps: int) -> tuple[int, int]:
    """(bytes the server sent, bytes the client reported) over `reps` calls of fn."""
    before = server.output_bytes()
    mid = server.output_bytes()  # the first INFO reply's size, as the server counts it
    reported = sum(fn() for _ in range(reps))  # type: ignore[operator]
    return server.output_bytes() - mid - (mid - before), reported


def bytes_row(server: PrivateServer, name: str, n: int, reps: int) -> tuple[str, bool]:
    store = seeded(server, f"bytes-{name}", n, 20, max(1, n // 100))
    out = np.empty(n, np.float32)
    full = server_bytes(server, lambda: store.download(out, 1.0).bytes_received, reps)
    tenth = server_bytes(server, lambda: store.download(out, 0.1).bytes_received, reps)

    def old() -> int:  # the download as it was: w and stat whole, θd·n·4 reported
        _, _, stat = store.read_params(with_stat=True)
        assert stat is not None
        return int(most_updated(stat, 0.1).size * 4)

    legacy = server_bytes(server, old, reps)
    store.delete_run()
    ratio = tenth[0] / full[0]
    agree = (tenth[1] / tenth[0], full[1] / full[0])
    row = (
        f"| {name} | {n:,} | {full[0] / reps / 1e6:.3f} MB | {tenth[0] / reps / 1e6:.3f} MB"
        f" | **{ratio:.3f}** | {agree[0]:.4f} / {agree[1]:.4f} | "
        f"{legacy[0] / reps / 1e6:.3f} MB, {legacy[0] / full[0]:.2f}, {legacy[1] / legacy[0]:.3f} |"
    )
    return row, ratio <= ACCEPT_RATIO and all(abs(a - 1) <= ACCEPT_AGREE for a in agree)


def bytes_section(reps: int) -> tuple[list[str], bool]:
    rows = [
        "| model | n | θd = 1, sent | θd = 0.1, sent | ratio | reported ÷ sent (0.1 / 1) | "
        "old θd = 0.1 download: sent, ratio, reported ÷ sent |",
        "|---|---|---|---|---|---|---|",
    ]
    ok = True
    server = PrivateServer(PORT)
    try:
        for name, n in model_sizes().items():
            row, good = bytes_row(server, name, n, reps)
            rows.append(row)
            ok &= good
    finally:
        server.stop()
    return rows, ok


class Costed:
    """One model's run on the private server, for interleaved timings (the machine's load
    drifts; taking the two models' samples turn about puts the same drift on both)."""

    def __init__(self, server: PrivateServer, n: int) -> None:
        self.n = n
        self.store = seeded(server, f"cost-{n}", n, 1, SMALL_K)
        self.fence = self.store.take_fence()
        self.state = self.store.load_state()
        self.rng = np.random.default_rng(1)
        self.out = np.empty(n, np.float32)
        self.one: list[float] = []
        self.batch: list[float] = []
        self.down: list[float] = []
        self.entries = 0
        self.seq = 2

    def commit(self, updates: int) -> float:
        for _ in range(updates):
            apply_one(
                self.state, np.sort(self.rng.choice(self.n, SMALL_K, replace=False)), self.rng
            )
        t = time.perf_counter()
        self.store.commit(self.fence, self.state, {0: f"{self.seq}:1"}, {"applied": updates}, [])
        self.seq += 1
        return (time.perf_counter() - t) / updates

    def download(self) -> None:
        t = time.perf_counter()
        got = self.store.download(self.out, 0.1)
        self.down.append(time.perf_counter() - t)
        self.entries = int(self.store.layout().sizes()[got.chunks].sum())


def cost_section(reps: int) -> tuple[list[str], bool]:
    rows = [
        "| n | chunk | commit of one update, k = 1,056 | commit, 50 updates of k = 1,056 "
        "(per update) | download θd = 0.1 | per downloaded entry |",
        "|---|---|---|---|---|---|",
    ]
    server = PrivateServer(PORT + 1)
    try:
        models = [Costed(server, 105_506), Costed(server, BIG)]
        for i in range(reps):
            for m in models if i % 2 else models[::-1]:
                m.one.append(m.commit(1))
                m.download()
                if i % 10 == 0:
                    m.batch.append(m.commit(50))
        figures = {}
        for m in models:
            c1, d1 = statistics.median(m.one), statistics.median(m.down)
            figures[m.n] = (c1, d1 / m.entries)
            rows.append(
                f"| {m.n:,} | {m.store.layout().chunk:,} | {c1 * 1e3:.2f} ms | "
                f"{statistics.median(m.batch) * 1e3:.3f} ms | {d1 * 1e3:.1f} ms | "
                f"{d1 / m.entries * 1e9:.1f} ns |"
            )
            m.store.delete_run()
    finally:
        server.stop()
    commit_growth = figures[BIG][0] / figures[105_506][0]
    down_growth = figures[BIG][1] / figures[105_506][1]
    rows.append("")
    rows.append(
        f"10 M ÷ 105 k: commit of one update at the same k **{commit_growth:.2f}×**, download "
        f"per downloaded entry at θd = 0.1 **{down_growth:.2f}×** (acceptance ≤ {ACCEPT_GROWTH}×)."
    )
    return rows, commit_growth <= ACCEPT_GROWTH and down_growth <= ACCEPT_GROWTH


def cluster_run(epochs: int) -> tuple[list[str], bool]:
    """The 10 M-parameter task trained end to end with its state on a 3-master Redis Cluster."""
    import json
    import subprocess

    cluster = PrivateCluster(PORT + 10)
    run_id = f"storage-cluster-{os.getpid()}"
    try:
        cmd = [sys.executable, "-m", "dssgd", "run", "--run-id", run_id, "--json"]
        cmd += ["--task", str(ROOT / "bench" / "big_task.py") + ":TASK", "--participants", "2"]
        cmd += ["--workers", "1", "--epochs", str(epochs), "--theta-u", "0.01"]
        cmd += ["--theta-d", "0.1", "--eval-interval", "600", "--runs-dir", "/tmp/dssgd-storage"]
        cmd += ["--redis-url", cluster.url + "?cluster=yes"]
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wall = time.monotonic() - t0
        if res.returncode != 0:
            return [f"cluster run failed ({res.returncode}): {res.stderr[-800:]}"], False
        out = json.loads(res.stdout)
    finally:
        cluster.stop()
        _delete_queues(run_id)  # its keys went with the private cluster; its queue is shared
    keys = ("accuracy", "epochs_total", "updates_applied", "bytes_down")
    row = ", ".join(f"{k} {out.get(k)}" for k in keys)
    ok = out.get("updates_applied") == out.get("epochs_total") == 2 * epochs
    return [f"10 M-parameter task (10,017,010 parameters) on a 3-master Redis Cluster, θu 0.01, "
            f"θd 0.1: {row}, "
            f"wall {wall:.0f} s (including start-up)."], ok  # fmt: skip


def _delete_queues(run_id: str) -> None:
    from dssgd.shared.amqp_names import AmqpNames
    from dssgd.shared.broker import connect as amqp_connect
    from dssgd.shared.broker import delete_topology
    from dssgd.shared.config import Connections

    conn = amqp_connect(Connections.from_env().amqp_url, "dssgd-bench")
    try:
        delete_topology(conn.channel(), AmqpNames(run_id))
    finally:
        conn.close()


def run_bytes() -> tuple[list[str], bool]:
    """Whole runs (MLP, 4 participants, 5 epochs) against a private Redis: the bytes down the run
    reports beside everything the server sent (downloads plus every other reply of the run)."""
    import json
    import subprocess

    rows = [
        "| θd | reported bytes down | server sent, whole run | reported ÷ sent |",
        "|---|---|---|---|",
    ]
    for theta_d in ("1", "0.1"):
        server = PrivateServer(PORT + 30)
        try:
            run_id = f"storage-bytes-{theta_d.replace('.', '-')}"
            cmd = [sys.executable, "-m", "dssgd", "run", "--run-id", run_id,
                   "--json", "--participants", "4", "--epochs", "5", "--theta-d", theta_d,
                   "--workers", "1", "--runs-dir", "/tmp/dssgd-storage",
                   "--redis-url", server.url]  # fmt: skip
            before = server.output_bytes()
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            sent = server.output_bytes() - before
            if res.returncode != 0:
                return [f"run failed: {res.stderr[-500:]}"], False
            down = int(json.loads(res.stdout)["bytes_down"])
            rows.append(
                f"| {theta_d} | {down / 1e6:.2f} MB | {sent / 1e6:.2f} MB | {down / sent:.3f} |"
            )
        finally:
            server.stop()
    return rows, True


def redis_chaos(seconds: float) -> tuple[list[str], bool]:
    """kill -9 the Redis master holding a run mid-run, restart it (AOF, fsync always), and check
    the exact-sum oracle: every confirmed update applied once, none twice, byte for byte."""
    import tempfile

    from dssgd.shared.config import Connections, RunConfig
    from dssgd.shared.errors import StoreError
    from redis.exceptions import RedisClusterException, RedisError

    from testing.oracle import assert_exact, read_oracle
    from testing.runs import RunHandle

    cluster = PrivateCluster(PORT + 20, durable=True)
    folder = Path(tempfile.mkdtemp(prefix="dssgd-storage-chaos-"))
    amqp = Connections.from_env().amqp_url
    conns = Connections(amqp_url=amqp, redis_url=cluster.url + "?cluster=yes")
    # epochs=0: no end of its own (3 × 30 epochs were over before the kill once commits got
    # cheaper); the bench stops it.
    cfg = RunConfig(run_id=f"storage-chaos-{os.getpid()}", participants=3, theta_u=0.01,
                    gamma=100.0, rule="sum", epochs=0)  # fmt: skip
    h = RunHandle(conns, cfg, zero_init=True)
    try:
        h.aggregator(log=folder / "agg.log")
        workers = [h.spawn("worker", "--synthetic", "--participants", str(p), "--record-dir",
                           str(folder), log=folder / f"w{p}.log") for p in range(3)]  # fmt: skip
        h.wait(lambda: h.version() > 30, timeout=120, what="the run under way")
        master = cluster.master_of(h.store.keys.version)
        at_kill = h.version()
        t_kill = time.monotonic()
        master.kill()
        time.sleep(1.0)
        master.start()

        def moved_on() -> bool:
            try:
                return h.version() > at_kill
            except (StoreError, RedisError, RedisClusterException):
                return False  # the cluster is down until the node is back

        h.wait(moved_on, timeout=120, what="commits after the restart")
        recover = time.monotonic() - t_kill
        time.sleep(seconds)
        h.store.request_stop("bench over")
        codes = [w.wait(timeout=120) for w in workers]
        confirmed = [u for p in range(3) for u in read_oracle(folder, p, h)[1]]
        h.wait(lambda: h.version() == len(confirmed), timeout=120, what="every confirmed update")
        log = [tuple(e.split(":")[:2]) for e in h.store.applied_log()]
        want = {(str(u.participant), str(u.seq)) for u in confirmed}
        lost, doubled = len(want - set(log)), len(log) - len(set(log))
        assert_exact(h, confirmed)
    finally:
        h.close()
        cluster.stop()
    ok = lost == doubled == 0 and codes == [0, 0, 0]
    return [f"kill -9 of the Redis master holding the run (restarted with its AOF, fsync always), "
            f"{len(confirmed)} confirmed updates: lost **{lost}**, doubled **{doubled}**, w and "
            f"stat byte-exact; commits resumed {recover:.1f} s after the kill."], ok  # fmt: skip


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    block = f"{MARK[0]}\n{text}\n{MARK[1]}"
    if MARK[0] in doc:
        doc = re.sub(re.escape(MARK[0]) + ".*?" + re.escape(MARK[1]), lambda _: block, doc,
                     flags=re.S)  # fmt: skip
    else:
        doc = doc.rstrip() + "\n\n## Chunked parameter storage (issue 15)\n\n" + block + "\n"
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--write-doc", action="store_true", help="record in docs/BENCHMARKS.md")
    ap.add_argument("--sections", default="bytes,cost,cluster,chaos", help="which, comma-separated")
    args = ap.parse_args(argv)
    want = set(args.sections.split(","))
    t0 = time.time()
    ok, parts = True, []
    if "bytes" in want:
        rows, good = bytes_section(3 if args.quick else 10)
        parts += ["**Bytes a download makes Redis send** (mean per download; `sent` is the "
                  "server's `total_net_output_bytes`, `reported` what the download counted on "
                  "its socket):", "", *rows, ""]  # fmt: skip
        ok &= good
    if "cost" in want:
        rows, good = cost_section(10 if args.quick else 40)
        parts += ["**Cost as the model grows** (medians; one update per commit, and batches of "
                  "50):", "", *rows, ""]  # fmt: skip
        ok &= good
    if "runbytes" in want:
        rows, good = run_bytes()
        parts += ["**Whole runs** (the rest of what the server sent is every other reply: the "
                  "aggregator's state load, the final evaluation's read, progress, leases):", "",
                  *rows, ""]  # fmt: skip
        ok &= good
    if "cluster" in want:
        rows, good = cluster_run(2)
        parts += ["**End to end on a Redis Cluster** (3 masters, private ports):", "", *rows, ""]
        ok &= good
    if "chaos" in want:
        rows, good = redis_chaos(5 if args.quick else 15)
        parts += ["**Chaos on the Redis Cluster** (synthetic participants, exact-sum oracle):",
                  "", *rows, ""]  # fmt: skip
        ok &= good
    load = os.getloadavg()[0]
    head = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))} by "
            f"`python -m bench.storage --sections {args.sections}` on a shared 2-core machine "
            f"(load average {load:.1f} at the end: other jobs ran beside it), against private "
            "redis-server 7.0 processes on ports of their own.")  # fmt: skip
    text = "\n".join([head, "", *parts]).rstrip()
    print(text)
    if args.write_doc:
        write_doc(text)
    print("acceptance:", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
