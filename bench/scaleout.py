"""Aggregator throughput: K ingest consumers against 1, the broker ceiling, CPU per update by part.

    python -m bench.scaleout                      # θu 0.01 and 0.1, K = 1 and 2 (~4 min)
    python -m bench.scaleout --theta 0.01 --consumers 3 --duration 6

In ONE run, per θu, the same publishers (bench.system: 3 processes, asynchronous confirms, CNN
updates of k = θu·105,506 entries) drive, one after the other:

* ``ceiling``   one ack-only consumer on a plain quorum queue: the broker's own limit;
* ``aggregator`` the real one-process aggregator (``python -m dssgd.aggregator``): decode,
                validate, apply, one fenced Lua commit per batch, ack;
* ``partitioned×K`` the real partitioned aggregator (``python -m dssgd.aggregator --ingest K``):
                K ingest processes (decode, validate, dedup, pre-sum, hand off, ack after the
                commit) and one applier (add, fenced commit): K = 1 and K = ``--consumers``,
                with CPU µs per applied update by part (ingest, applier, broker, Redis,
                publishers) from /proc;
* ``ingest×K``  (``--prototype`` only) K consumer processes on one queue doing an ingest's work
                per message with no applier: decode, validate, pre-sum, ack.

Then the aggregator's parts are timed in this process on the same messages (CPU seconds,
``time.process_time``): decode, validate (admission minus decode), apply (``apply_batch``),
commit (client side of ``RunStore.commit``; Redis's own CPU for it is read from the server's
``used_cpu_sys``+``used_cpu_user`` around the commits) and, from the ceiling run, the broker
client's cost of receiving and acking one message. From those the report derives what the
partitioned design needs on 4 and 8 cores. Figures: docs/BENCHMARKS.md, "Aggregator scale-out".
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pika
from dssgd.aggregator.admission import Accepted, Admission
from dssgd.aggregator.batch import apply_batch
from dssgd.shared import wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Delivery, declare_topology, delete_partitions, delete_topology
from dssgd.shared.broker import connect as amqp_connect
from dssgd.shared.config import RunConfig
from dssgd.shared.rules import UpdateRule

from bench import system as S


def _ingest_main(amqp_url: str, queue: str, run_id: str, theta: float, ready: Any,
                 done: Any, expected: Any, results: Any) -> None:
    """One ingest consumer: decode, validate, pre-sum, ack (multiple every 100)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = RunConfig(run_id=run_id, model="cnn", participants=1000, theta_u=theta, gamma=100.0,
                    rule="sum", queue_max_length=1_000_000)
    admission = Admission(cfg, S.N_CNN, None)
    acc = np.zeros(S.N_CNN, np.float32)
    params = pika.URLParameters(amqp_url)
    params.heartbeat = 0
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1000)
    st = {"n": 0, "ok": 0, "tag": 0, "unacked": 0, "t_first": 0.0, "t_last": 0.0}

    def on_message(chan: Any, method: Any, _props: Any, body: bytes) -> None:
        d = Delivery(method.delivery_tag, body, method.routing_key, None, None)
        v = admission.admit(d, lambda _p: (0, 0))
        if isinstance(v, Accepted):
            np.add.at(acc, v.update.indices, v.update.values)
            st["ok"] += 1
        st["n"] += 1
        st["tag"] = method.delivery_tag
        st["unacked"] += 1
        if st["unacked"] >= 100:
            chan.basic_ack(method.delivery_tag, multiple=True)
            st["unacked"] = 0
        now = time.time()
        st["t_first"] = st["t_first"] or now
        st["t_last"] = now
        with done.get_lock():
            done.value += 1

    ch.basic_consume(queue, on_message, auto_ack=False)
    ready.put(os.getpid())
    limit = time.time() + 900
    while time.time() < limit:
        conn.process_data_events(time_limit=0.05)
        if st["unacked"] and time.time() - st["t_last"] > 0.05:
            ch.basic_ack(st["tag"], multiple=True)
            st["unacked"] = 0
        if expected.value > 0 and done.value >= expected.value:
            break
    if st["unacked"]:
        ch.basic_ack(st["tag"], multiple=True)
    conn.close()
    results.put({k: st[k] for k in ("n", "ok", "t_first", "t_last")})


def measure_ingest(cfg: S.LoadSettings, theta: float, consumers: int) -> S.LoadResult:
    """K ingest consumers on a run's own queue (routing keys name the participants, as the
    admission checks) under the ceiling's load."""
    run_id = S.new_id("ingest")
    names = AmqpNames(run_id)
    conn = amqp_connect(S.conns().amqp_url, "bench-ingest", heartbeat=0)
    declare_topology(conn.channel(), names, 1_000_000)
    conn.close()
    qname = names.queue
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    done, expected = ctx.Value("q", 0), ctx.Value("q", 0)
    workers = [ctx.Process(target=_ingest_main, daemon=True,
                           args=(S.conns().amqp_url, qname, run_id, theta, ready, done,
                                 expected, results)) for _ in range(consumers)]
    procs: list[Any] = []
    try:
        for w in workers:
            w.start()
        for _ in workers:
            ready.get(timeout=120)
        procs, go, pub_results = S._start_publishers(
            S._specs(cfg, run_id, theta, names.exchange, ""))
        meter = S.CpuMeter()
        for w in workers:
            meter.watch("ingest", w.pid)
        for p in procs:
            meter.watch("publishers", p.pid)
        S._watch_services(meter)
        meter.sample()
        go.set()
        rows = S._collect(pub_results, len(procs), cfg.duration + 300)
        acked, nacked, nbytes, t0, t1 = S._pub_summary(rows)
        meter.sample()
        expected.value = sum(r["sent"] for r in rows) - nacked
        got = [results.get(timeout=300) for _ in workers]
        meter.sample()
        t_last = max(g["t_last"] for g in got)
        n = sum(g["n"] for g in got)
        bad = n - sum(g["ok"] for g in got)
        k = max(1, round(theta * S.N_CNN))
        return S.LoadResult(f"ingest×{consumers}", theta, n, nbytes, n * k, t_last - t0,
                            t1 - t0, acked / (t1 - t0), nacked=nacked, rejected=bad,
                            cpu=S._shares(meter, t0, t_last))
    finally:
        for p in [*procs, *workers]:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        conn = amqp_connect(S.conns().amqp_url, "bench-ingest", heartbeat=0)
        delete_topology(conn.channel(), names)
        conn.close()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def measure_partitioned(cfg: S.LoadSettings, theta: float, ingest: int) -> S.LoadResult:
    """The real partitioned aggregator, ``python -m dssgd.aggregator --ingest K``: the applier
    (this process's child) and its K ingest processes (its children), under the same load; the
    end is the moment the version shows every confirmed message applied."""
    run_id = S.new_id(f"so-part{ingest}")
    run = S.BenchRun(run_id, cfg.publishers * cfg.participants_each, theta)
    names = AmqpNames(run_id)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs: list[Any] = []
    with run.log.open("ab") as out:
        applier = subprocess.Popen(
            [sys.executable, "-m", "dssgd.aggregator", "--run-id", run_id, "--no-eval",
             "--ingest", str(ingest)], cwd=S.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_consumers(names, ingest, applier, run.log)
        procs, go, pub_results = S._start_publishers(
            S._specs(cfg, run_id, theta, names.exchange, ""))
        meter = S.CpuMeter()
        meter.watch("applier", applier.pid)
        for c in _children(applier.pid):
            meter.watch("ingest", c)
        for p in procs:
            meter.watch("publishers", p.pid)
        S._watch_services(meter)
        meter.sample()
        go.set()
        last = [time.time()]

        def poll() -> None:
            if time.time() - last[0] >= 0.5:
                meter.sample()
                last[0] = time.time()

        rows = S._collect(pub_results, len(procs), cfg.duration + 300, poll)
        acked, nacked, nbytes, t0, t1 = S._pub_summary(rows)
        deadline = time.time() + 600
        while run.version() < acked:
            if time.time() > deadline or applier.poll() is not None:
                raise RuntimeError(f"partitioned aggregator applied {run.version()} of {acked}; "
                                   f"see {run.log}")
            poll()
            time.sleep(0.002)
        t_end = time.time()
        meter.sample()
        counters = run.store.counters()
        k = max(1, round(theta * S.N_CNN))
        return S.LoadResult(f"partitioned×{ingest}", theta, acked, nbytes, acked * k, t_end - t0,
                            t1 - t0, acked / (t1 - t0), nacked=nacked,
                            commits=counters.get("commits", 0),
                            rejected=counters.get("rejected", 0),
                            duplicates=counters.get("duplicates", 0),
                            cpu=S._shares(meter, t0, t_end))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        applier.send_signal(signal.SIGTERM)  # it stops its ingests
        try:
            applier.wait(timeout=20)
        except subprocess.TimeoutExpired:
            applier.kill()
            applier.wait()
        conn = amqp_connect(S.conns().amqp_url, "bench-part", heartbeat=0)
        delete_partitions(conn.channel(), names, ingest)
        conn.close()
        run.close()


def _wait_consumers(names: AmqpNames, k: int, proc: Any, log: Path) -> None:
    """Until each of the K partition queues has its ingest consuming."""
    conn = amqp_connect(S.conns().amqp_url, "bench-probe", heartbeat=0)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"partitioned aggregator exited; see {log}")
            ready = 0
            for i in range(k):
                ch = conn.channel()
                try:
                    q = ch.queue_declare(names.partition_queue(i, k), passive=True)
                    ready += q.method.consumer_count > 0
                    ch.close()
                except pika.exceptions.ChannelClosedByBroker:
                    pass
            if ready == k:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the ingests did not start; see {log}")
    finally:
        conn.close()


def _redis_cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def components(theta: float, messages: int = 3000, batch: int = 500) -> dict[str, float]:
    """CPU µs per update of each part of the aggregator, timed here on realistic messages."""
    run = S.BenchRun(S.new_id("parts"), 30, theta)
    try:
        templates, at = S.make_templates(run.run_id, theta, 16, seed=3)
        deliveries = []
        for i in range(messages):
            p, seq = i % 30, S.SEQ0 + i // 30 + 1
            body = S.stamp(templates[i % len(templates)], p, seq, at)
            deliveries.append(Delivery(i + 1, body, f"upd.{p}", None, None))
        cfg = run.cfg
        admission = Admission(cfg, S.N_CNN, None)
        t = time.process_time()
        for d in deliveries:
            wire.decode(d.body, expected_run=cfg.run_id, expected_n=S.N_CNN)
        decode = time.process_time() - t
        state = run.store.load_state()
        t = time.process_time()
        verdicts = [admission.admit(d, lambda p: state.dedup.get(p, (0, 0))) for d in deliveries]
        admit = time.process_time() - t
        acc = np.zeros(S.N_CNN, np.float32)
        t = time.process_time()
        for v in verdicts:
            if isinstance(v, Accepted):
                np.add.at(acc, v.update.indices, v.update.values)
        presum = time.process_time() - t
        rule = UpdateRule(cfg.effective_rule, cfg.staleness_exponent, cfg.participants)
        fence = run.store.take_fence()
        apply_s = commit_s = commit_wall = 0.0
        redis0 = _redis_cpu(run.store.r)
        for lo in range(0, messages, batch):
            t = time.process_time()
            out = apply_batch(state, verdicts[lo:lo + batch], cfg, rule)
            apply_s += time.process_time() - t
            t, w = time.process_time(), time.perf_counter()
            run.store.commit(fence, state, out.dedup_changes, dict(out.counters),
                             [f"{e}:0" for e in out.log_entries])
            commit_s += time.process_time() - t
            commit_wall += time.perf_counter() - w
        redis_s = _redis_cpu(run.store.r) - redis0  # the shared server: others' work included
        per = 1e6 / messages
        return {"decode": decode * per, "validate": (admit - decode) * per,
                "pre-sum": presum * per, "apply": apply_s * per, "commit (client)": commit_s * per,
                "commit (Redis)": redis_s * per, "commit wall": commit_wall * per,
                "applied": float(sum(isinstance(v, Accepted) for v in verdicts))}
    finally:
        run.close()


def _cpu_s(r: S.LoadResult, name: str) -> float:
    return r.cpu.get(name, 0.0) * S.NPROC * r.seconds


def partitioned_report(rows: list[S.LoadResult]) -> list[str]:
    """CPU µs per applied update, by part, of each run of the real partitioned aggregator."""
    out = []
    for r in rows:
        per = {name: 1e6 * _cpu_s(r, name) / max(1, r.messages)
               for name in ("ingest", "applier", "broker", "redis", "publishers")}
        out.append(f"  {r.what} CPU µs per applied update: "
                   + ", ".join(f"{k} {v:.0f}" for k, v in per.items())
                   + f"; {r.messages} applied in {r.commits} commits, duplicates {r.duplicates}")
    return out


def report(theta: float, ceiling: S.LoadResult, ingest: list[S.LoadResult], agg: S.LoadResult,
           parts: dict[str, float], partitioned: list[S.LoadResult] | None = None) -> str:
    lines = [f"θu = {theta}  (k = {max(1, round(theta * S.N_CNN)):,} entries per update), "
             f"load {S.loadavg():.1f}",
             f"  {'what':<14} {'msg/s':>8} {'× ceiling':>9}  CPU shares of all {S.NPROC} cores"]
    for r in [ceiling, *ingest, agg, *(partitioned or [])]:
        shares = ", ".join(f"{k} {v:.2f}" for k, v in r.cpu.items())
        lines.append(f"  {r.what:<14} {r.msg_per_s:>8.0f} {r.msg_per_s / ceiling.msg_per_s:>9.2f}"
                     f"  {shares}")
    consume = 1e6 * _cpu_s(ceiling, "consumer") / max(1, ceiling.messages)
    agg_cpu = 1e6 * _cpu_s(agg, "aggregator") / max(1, agg.messages)
    broker = 1e6 * _cpu_s(ceiling, "broker") / max(1, ceiling.messages)
    lines.append(f"  CPU µs per update: receive+ack (ceiling consumer) {consume:.0f}; "
                 + "; ".join(f"{k} {v:.0f}" for k, v in parts.items() if k != "applied")
                 + f"; whole aggregator process {agg_cpu:.0f}; broker per message at the "
                 f"ceiling {broker:.0f}")
    pubs = 1e6 * _cpu_s(ceiling, "publishers") / max(1, ceiling.messages)
    ingest_us = consume + parts["decode"] + parts["validate"] + parts["pre-sum"]
    # The applier of a partitioned design adds one pre-summed vector per partition and batch
    # and commits it; the per-update apply moved upstream into the ingest tier (pre-sum).
    applier_us = parts["commit (client)"] + parts["commit (Redis)"]
    goal = 0.7 * ceiling.msg_per_s
    per_msg = pubs + broker + ingest_us + applier_us
    k = max(1, int(np.ceil(goal * ingest_us / 0.9e6)))  # ingest processes at ≤ 90 % of a core
    lines.append(f"  goal 0.7 × ceiling = {goal:.0f} msg/s needs publishers {pubs:.0f} + broker "
                 f"{broker:.0f} + ingest {ingest_us:.0f} + applier {applier_us:.0f} µs per update "
                 f"= {goal * per_msg / 1e6:.2f} cores (this machine: {S.NPROC}); K = {k} ingest "
                 f"processes; one applier caps at {1e6 / max(applier_us, 1e-9):.0f} msg/s")
    lines += partitioned_report(partitioned or [])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--theta", type=float, action="append", help="θu (repeatable; 0.01, 0.1)")
    ap.add_argument("--consumers", type=int, default=2, help="K of the ingest tier (default 2)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of publishing per phase")
    ap.add_argument("--prototype", action="store_true",
                    help="also the ingest-only prototype (decode, validate, pre-sum, ack)")
    args = ap.parse_args(argv)
    if args.consumers < 1:
        print("--consumers must be >= 1", file=sys.stderr)
        return 2
    cfg = S.LoadSettings(duration=args.duration)
    print(f"[scaleout] {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC, {platform.node()}, "
          f"{S.NPROC} cores, load {S.loadavg():.1f}; broker {S.conns().amqp_url.split('@')[-1]}",
          flush=True)
    out = []
    for theta in args.theta or [0.01, 0.1]:
        print(f"[scaleout] θu={theta}: ceiling", flush=True)
        ceiling = S.measure_ceiling(cfg, theta, S.new_id("so-ceil"))
        ingest = []
        for k in sorted({1, args.consumers}) if args.prototype else []:
            print(f"[scaleout] θu={theta}: ingest×{k}", flush=True)
            ingest.append(measure_ingest(cfg, theta, k))
        print(f"[scaleout] θu={theta}: aggregator", flush=True)
        agg = S.measure_aggregator(cfg, theta, S.new_id("so-agg"))
        partitioned = []
        for k in sorted({1, args.consumers}):
            print(f"[scaleout] θu={theta}: partitioned×{k}", flush=True)
            partitioned.append(measure_partitioned(cfg, theta, k))
        print(f"[scaleout] θu={theta}: parts", flush=True)
        parts = components(theta)
        out.append(report(theta, ceiling, ingest, agg, parts, partitioned))
        print(out[-1], flush=True)
    print("\n" + "\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
