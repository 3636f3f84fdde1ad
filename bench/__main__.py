"""System benchmarks (issue 7): the whole system on this machine, every figure a ratio to a
ceiling measured in the same run.

    python -m bench              # full run (8-10 minutes on 2 cores); writes docs/BENCHMARKS.md
    python -m bench --quick      # 2-3 minutes; prints only (add --write-doc to record it)
    python -m bench --sections 1,4   # a subset; prints only

Sections:

1. aggregator capacity at θu = 0.01, 0.1, 1 against the broker's own ceiling for the same bytes;
2. how many participants one aggregator sustains (capacity ÷ one participant's update rate);
3. a participant's overhead outside local SGD (CNN, asynchronous, θd = 1);
4. time to 0.93 test accuracy of the default ``dssgd run`` against centralized training;
5. scaling to N = 10, 30, 150 participants: throughput, queue depth, CPU shares;
6. scale: N = 1,000 × 600 and N = 10,000 × 60 (``bench/scale.py``; quick mode: 1,000 only).

Exit code 1 if an acceptance line fails. See docs/BENCHMARKS.md for how each figure is measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from dssgd.shared.config import RunConfig

from bench import system as S

DOC = S.ROOT / "docs" / "BENCHMARKS.md"
HEADER = "## System benchmarks (issue 7)"
END_MARK = "<!-- end of generated figures: notes below this line are kept on regeneration -->"
TARGET = 0.93
THETAS = (0.01, 0.1, 1.0)
ACCEPT_CAPACITY = 0.7  # aggregator ÷ ceiling, at θu 0.01 and 0.1
ACCEPT_OVERHEAD = 0.10
ACCEPT_TTA = 2.0


@dataclass
class Plan:
    quick: bool
    duration: float
    max_bytes: int
    publishers: int
    mlp_epochs: int
    cnn_epochs: int
    overhead_epochs: int
    tta_repeats: int
    drain_seconds: float  # 0 = no backlog-drain diagnostic
    scaling: tuple[int, ...]  # N
    scaling_seconds: float  # aim of each scaling run's training time (E is derived from it)

    @classmethod
    def make(cls, quick: bool, publishers: int) -> Plan:
        if quick:
            return cls(True, 1.0, 300_000_000, publishers, 8, 3, 4, 1, 0.0,
                       (10, 30, 150), 4.0)
        return cls(False, 8.0, 2_000_000_000, publishers, 40, 12, 15, 3, 5.0,
                   (10, 30, 150), 30.0)


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    accept: list[tuple[str, str, str, bool]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, text: str = "") -> None:
        self.lines.append(text)
        print(text, flush=True)

    def check(self, what: str, required: str, measured: str, ok: bool) -> None:
        self.accept.append((what, required, measured, ok))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def fmt(x: float | None, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


# --------------------------------------------------------------------------------------------
# 1. Aggregator capacity


def section_capacity(plan: Plan, rep: Report) -> dict[float, tuple[S.LoadResult, S.LoadResult]]:
    cfg = S.LoadSettings(publishers=plan.publishers, duration=plan.duration,
                         max_bytes=plan.max_bytes)
    out = {}
    drains: dict[float, tuple[S.DrainResult, S.DrainResult]] = {}
    for theta in THETAS:
        run_id = S.new_id(f"cap{theta:g}".replace(".", ""))
        log(f"capacity θu={theta}: ceiling (ack-only consumer)")
        ceiling = S.measure_ceiling(cfg, theta, run_id)
        log(f"capacity θu={theta}: aggregator")
        agg = S.measure_aggregator(cfg, theta, run_id)
        out[theta] = (ceiling, agg)
        if plan.drain_seconds:
            count = min(agg.messages, max(1000, int(plan.drain_seconds * agg.msg_per_s)))
            log(f"capacity θu={theta}: draining a backlog of {count} (ceiling, then aggregator)")
            d_ceiling = S.drain_ceiling(cfg, theta, run_id, count)
            d_agg = S.drain_aggregator(cfg, theta, run_id, count)
            drains[theta] = (d_ceiling, d_agg)
    rep.add(f"1. Aggregator capacity: CNN updates (n = {S.N_CNN:,}), {cfg.publishers} publisher "
            f"processes with asynchronous confirms (window {cfg.window}), {cfg.duration:g} s of "
            "publishing;")
    rep.add("   end to end = first publish -> last message consumed (ceiling: empty consumer, "
            "plain quorum")
    rep.add("   queue) or committed (aggregator: version key). CPU = share of all cores during "
            "that time.")
    rep.add("")
    rep.add("theta_u  B/msg   ceiling msg/s  MB/s   aggregator msg/s  entries/s  ratio  "
            "msgs/commit  agg CPU  pub rate ceil/agg")
    for theta, (c, a) in out.items():
        ratio = a.msg_per_s / c.msg_per_s if c.msg_per_s else 0.0
        batch = a.messages / a.commits if a.commits else 0.0
        rep.add(f"{theta:7g}  {c.bytes / max(1, c.messages):6.0f}  {c.msg_per_s:13.0f}  "
                f"{c.mb_per_s:5.0f}  {a.msg_per_s:16.0f}  {a.entries_per_s / 1e6:7.1f} M  "
                f"{ratio:5.2f}  {batch:11.1f}  {100 * a.cpu.get('aggregator', 0):5.0f} %  "
                f"{c.published_per_s:6.0f}/{a.published_per_s:.0f}")
        if a.rejected or a.duplicates or a.nacked or c.nacked:
            rep.add(f"         ! rejected {a.rejected}, duplicates {a.duplicates}, refused "
                    f"{a.nacked}/{c.nacked}")
        if theta in (0.01, 0.1):
            rep.check(f"aggregator ÷ ceiling at θu = {theta:g}", f"≥ {ACCEPT_CAPACITY}",
                      f"{ratio:.2f} ({a.msg_per_s:.0f} / {c.msg_per_s:.0f} msg/s)",
                      ratio >= ACCEPT_CAPACITY)
    rep.add("")
    rep.add("CPU shares of all cores (ceiling run | aggregator run):")
    for theta, (c, a) in out.items():
        def shares(r: S.LoadResult) -> str:
            keys = ("consumer", "aggregator", "aggregator main thread", "publishers", "broker",
                    "redis", "machine")
            return ", ".join(f"{k} {100 * r.cpu[k]:.0f}%" for k in keys if k in r.cpu)
        rep.add(f"  θu={theta:g}: {shares(c)} | {shares(a)}")
    rep.add("")
    if not drains:
        return out
    rep.add("   Backlog drain (diagnostic: the same messages queued first, then consumed with "
            "nobody publishing;")
    rep.add("   from the first delivery / first commit to the last):")
    rep.add("theta_u  messages  ceiling msg/s  aggregator msg/s  ratio  msgs/commit  agg CPU  "
            "broker CPU")
    for theta, (dc, da) in drains.items():
        ratio = da.msg_per_s / dc.msg_per_s if dc.msg_per_s else 0.0
        batch = (da.messages / da.commits) if da.commits else 0.0
        rep.add(f"{theta:7g}  {da.messages:8d}  {dc.msg_per_s:13.0f}  {da.msg_per_s:16.0f}  "
                f"{ratio:5.2f}  {batch:11.1f}  {100 * da.cpu.get('aggregator', 0):5.0f} %  "
                f"{100 * da.cpu.get('broker', 0):8.0f} %")
    rep.add("")
    return out


# --------------------------------------------------------------------------------------------
# 2. Participants one aggregator sustains


def participant_rate(model: str, epochs: int) -> dict[str, float]:
    rec = S.drive_run(["--model", model, "--participants", "1", "--workers", "1",
                       "--epochs", str(epochs)], f"rate-{model}", progress_every=0.01,
                      watch=False)
    p = rec.final[0]
    e = int(p["epochs"])
    last_seen_1, _ = rec.first_epoch[0]
    rate = (e - 1) / (float(p["last_seen"]) - last_seen_1)
    return {"epochs": e, "rate": rate, "train": float(p["t_train"]) / e,
            "epoch": float(p["t_epoch"]) / e, "bytes_up": int(p["bytes_up"]) / e,
            "busy": rec.machine_busy or 0.0}


def section_participants(plan: Plan, rep: Report, capacity: float | None) -> float:
    rows = {}
    for model, epochs in (("mlp", plan.mlp_epochs), ("cnn", plan.cnn_epochs)):
        log(f"participant rate: {model}, {epochs} epochs")
        rows[model] = participant_rate(model, epochs)
    rep.add("2. Participants one aggregator sustains (θu = 0.1, 600 images per epoch): one "
            "participant alone")
    rep.add("   (`dssgd run --participants 1 --workers 1`); its rate = epochs 2..E over the time "
            "from the end")
    rep.add("   of epoch 1 to the end of epoch E (download, SGD, select, encode, confirmed "
            "publish, bookkeeping).")
    rep.add("   Capacity = the aggregator's end-to-end msg/s at θu = 0.1 from section 1 (CNN-sized "
            "messages).")
    rep.add("")
    rep.add("model  SGD ms/epoch  epoch ms (download..confirm)  epochs/s  B/update  capacity "
            "msg/s  participants  machine busy")
    for model, r in rows.items():
        n = capacity / r["rate"] if capacity else None
        rep.add(f"{model:5}  {1000 * r['train']:12.1f}  {1000 * r['epoch']:28.1f}  "
                f"{r['rate']:8.1f}  {r['bytes_up']:8.0f}  {fmt(capacity, '14.0f')}  "
                f"{fmt(n, '12.0f')}  {100 * r['busy']:10.0f} %")
        rep.facts[f"sustained_{model}"] = n
    rep.add("")
    return rows["mlp"]["rate"]


# --------------------------------------------------------------------------------------------
# 3. Participant overhead


def section_overhead(plan: Plan, rep: Report) -> None:
    args = ["--model", "cnn", "--participants", "2", "--workers", "2", "--epochs",
            str(plan.overhead_epochs), "--lr", "0.1"]
    log(f"overhead: dssgd run {' '.join(args)}")
    rec = S.drive_run(args, "overhead", progress_every=0.01, watch=False)
    rep.add("3. Participant overhead: `dssgd run " + " ".join(args) + "` (asynchronous, θd = 1).")
    rep.add("   wall = first download -> last confirm of a participant (end of its last epoch "
            "minus the start")
    rep.add("   of its first, from the progress hash: last_seen, t_epoch); SGD = its t_train; "
            "in-epoch = t_epoch - t_train")
    rep.add("   (download, copy, select, encode, confirmed publish); between = wall - t_epoch "
            "(bookkeeping).")
    rep.add("")
    rep.add("participant  epochs  wall s  SGD s  in-epoch s  between s  overhead")
    tot_wall = tot_train = tot_epoch = 0.0
    for pid in sorted(rec.final):
        p = rec.final[pid]
        wall = rec.participant_wall(pid)
        if wall is None:
            continue
        train, epoch = float(p["t_train"]), float(p["t_epoch"])
        tot_wall, tot_train, tot_epoch = tot_wall + wall, tot_train + train, tot_epoch + epoch
        rep.add(f"{pid:11d}  {int(p['epochs']):6d}  {wall:6.2f}  {train:5.2f}  "
                f"{epoch - train:10.3f}  {wall - epoch:9.3f}  {100 * (1 - train / wall):6.1f} %")
    overhead = 1 - tot_train / tot_wall if tot_wall else float("nan")
    rep.add(f"{'all':>11}  {'':6}  {tot_wall:6.2f}  {tot_train:5.2f}  {tot_epoch - tot_train:10.3f}"
            f"  {tot_wall - tot_epoch:9.3f}  {100 * overhead:6.1f} %")
    rep.add(f"   (whole command {rec.wall:.1f} s; final accuracy "
            f"{rec.summary.get('accuracy', float('nan')):.4f}; machine busy "
            f"{100 * (rec.machine_busy or 0):.0f} % of all cores)")
    rep.add("")
    rep.check("participant overhead, CNN async θd = 1", f"≤ {100 * ACCEPT_OVERHEAD:.0f} %",
              f"{100 * overhead:.1f} %", overhead <= ACCEPT_OVERHEAD)


# --------------------------------------------------------------------------------------------
# 4. Time to accuracy


def dssgd_time_to(rec: S.RunRecord, target: float) -> dict[str, float | None]:
    pts = sorted(rec.metrics, key=lambda m: m["time"])
    hit = next((i for i, m in enumerate(pts) if m["accuracy"] >= target), None)
    start = pts[0]["time"] - pts[0]["elapsed"] if pts else None  # the evaluator's start
    out: dict[str, float | None] = {
        "startup": None if start is None else start - rec.t_start, "time": None, "before": None,
        "final": rec.summary.get("accuracy"), "wall": rec.wall,
    }
    if hit is not None:
        out["time"] = pts[hit]["time"] - rec.t_start
        out["before"] = pts[hit - 1]["time"] - rec.t_start if hit else out["startup"]
    return out


def section_tta(plan: Plan, rep: Report) -> None:
    runs, central, stones = [], [], []
    for i in range(plan.tta_repeats):
        log(f"time to accuracy: default dssgd run ({i + 1}/{plan.tta_repeats})")
        rec = S.drive_run([], "tta", progress_every=0.05, watch=False)
        runs.append(dssgd_time_to(rec, TARGET))
        runs[-1]["busy"] = rec.machine_busy
        stones.append(rec.milestones)
        pair = []
        for threads in (1, 2) if not plan.quick else (1,):
            log(f"time to accuracy: centralized, {threads} torch thread(s) "
                f"({i + 1}/{plan.tta_repeats})")
            pair.append(S.run_centralized(TARGET, threads))
        central.append(pair)
    rep.add(f"4. Time to {TARGET} test accuracy, from process start: the default `dssgd run` "
            "(10 × 600 images, MLP,")
    every = RunConfig().eval_interval
    rep.add(f"   θu = 0.1, async; accuracy evaluated every ≥ {every:g} s by the aggregator) "
            "against centralized training of")
    rep.add("   the same MLP on the union of the 10 shards (lr 0.2, batch 32, evaluated after "
            "every epoch) in a fresh")
    rep.add("   process, with 1 and (full mode) 2 torch threads; the faster is the ceiling.")
    rep.add("")
    rep.add("run  dssgd: start-up s  to target s  (previous eval)  whole run s  final acc  "
            "machine busy  |  centralized to target s: 1 thread  2 threads  (epochs)")
    ratios, c_best = [], []
    for i, (d, pair) in enumerate(zip(runs, central, strict=True)):
        times = [c.time_to(TARGET) for c in pair] + [None] * (2 - len(pair))
        best = min((t for t in times if t is not None), default=None)
        c_best.append(best)
        epochs = next((j + 1 for j, (_, a) in enumerate(pair[0].points) if a >= TARGET), None)
        rep.add(f"{i + 1:3d}  {fmt(d['startup'], '17.1f')}  {fmt(d['time'], '11.1f')}  "
                f"({fmt(d['before'], '5.1f')})        {fmt(d['wall'], '11.1f')}  "
                f"{fmt(d['final'], '9.4f')}  {fmt(100 * (d['busy'] or 0), '10.0f')} %  |  "
                f"{fmt(times[0], '31.1f')}  {fmt(times[1], '9.1f')}  ({epochs})")
        if d["time"] is not None and best:
            ratios.append(d["time"] / best)
    rep.add("dssgd start-up, seconds after the command started (median): " + ", ".join(
        f"{k} {statistics.median(m[k] for m in stones if k in m):.1f}"
        for k in stones[0]))
    d_med = statistics.median([d["time"] for d in runs if d["time"] is not None] or [float("nan")])
    c_med = statistics.median([c for c in c_best if c is not None] or [float("nan")])
    ratio = d_med / c_med
    rep.add(f"median: dssgd {d_med:.1f} s, centralized {c_med:.1f} s, ratio {ratio:.2f} "
            f"(per pair: {', '.join(f'{r:.2f}' for r in ratios)})")
    rep.add("")
    rep.check(f"time to {TARGET}: dssgd ÷ centralized", f"≤ {ACCEPT_TTA:g}", f"{ratio:.2f} "
              f"({d_med:.1f} s / {c_med:.1f} s)", ratio <= ACCEPT_TTA)


# --------------------------------------------------------------------------------------------
# 5. Scaling


def thirds(samples: list[tuple[float, int]], t0: float, t1: float) -> tuple[float, float, int]:
    inside = [v for t, v in samples if t0 <= t <= t1]
    if not inside:
        return 0.0, 0.0, 0
    k = max(1, len(inside) // 3)
    return statistics.fmean(inside[:k]), statistics.fmean(inside[-k:]), max(inside)


def section_scaling(plan: Plan, rep: Report, mlp_rate: float | None) -> None:
    # E from one participant's measured rate (section 2) so that each run trains for about
    # plan.scaling_seconds with 2 busy workers; a time limit keeps a slow machine bounded.
    rate = mlp_rate or 30.0
    rows = []
    for n in plan.scaling:
        epochs = max(2, round(plan.scaling_seconds * 1.6 * rate / n))
        log(f"scaling: N={n}, {epochs} epochs each")
        load = S.loadavg()
        rec = S.drive_run(["--participants", str(n), "--epochs", str(epochs),
                           "--time-limit", str(round(3 * plan.scaling_seconds + 30))],
                          f"scale{n}", progress_every=0.25, sample_every=0.5)
        rows.append((n, epochs, rec, load))
    rep.add("5. Scaling (MLP, async, 2 worker processes): participant-epochs/s between 10 % and "
            "90 % of all epochs;")
    rep.add("   queue = ready messages (passive declare every 0.5 s), unapplied = confirmed - "
            "applied updates")
    rep.add("   (includes the aggregator's prefetched ones), both from the first epoch to the "
            "last; CPU = share")
    rep.add("   of all cores in the 10-90 % window; others = the rest of the machine's busy time "
            "(other users).")
    rep.add("")
    rep.add("    N    E  wall s  epochs/s  queue max  first/last third  unapplied max  first/last "
            "third  agg CPU (main)  workers  broker  redis  others  load")
    for n, epochs, rec, load in rows:
        win = rec.epoch_window()
        first_t = min((t for t, e in rec.epochs if e > 0), default=rec.t_start)
        last_t = next((t for t, e in rec.epochs if e >= n * epochs), rec.t_exit)
        q1, q3, qmax = thirds(rec.depth, first_t, last_t)
        u1, u3, umax = thirds(rec.unapplied, first_t, last_t)
        cpu: dict[str, float | None] = {}
        speed = None
        if win:
            t_lo, t_hi, speed = win
            cpu = {k: rec.cpu.share(k, t_lo, t_hi) for k in
                   ("aggregator", "aggregator main thread", "workers", "broker", "redis",
                    "machine")}
            ours = sum(cpu.get(k) or 0.0 for k in ("aggregator", "workers", "broker", "redis"))
            cpu["others"] = max(0.0, (cpu.get("machine") or 0.0) - ours)

        def pct(k: str, cpu: dict[str, float | None] = cpu) -> str:
            v = cpu.get(k)
            return "-" if v is None else f"{100 * v:.0f}%"

        rep.add(f"{n:5d}  {epochs:>3}  {rec.wall:6.1f}  {fmt(speed, '8.1f')}  {qmax:9d}  "
                f"{q1:7.1f}/{q3:<8.1f}  {umax:13d}  {u1:7.1f}/{u3:<8.1f}  "
                f"{pct('aggregator'):>7} ({pct('aggregator main thread')})  "
                f"{pct('workers'):>7}  {pct('broker'):>6}  {pct('redis'):>5}  "
                f"{pct('others'):>6}  {load:4.1f}")
        if n == max(plan.scaling):
            bounded = qmax <= n and q3 <= max(2 * q1, 1.0) and umax <= 2 * n
            rep.check(f"queue depth bounded at N = {n}", "no growth (last third ≤ 2 × first "
                      "third), max ≤ N ready", f"max {qmax} ready / {umax} unapplied; thirds "
                      f"{q1:.1f} → {q3:.1f}", bounded)
    rep.add("")


# --------------------------------------------------------------------------------------------
# Output


def header_lines(plan: Plan, argv: list[str], info: dict[str, str]) -> list[str]:
    return [
        f"command: python -m bench {' '.join(argv)}".rstrip(),
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"machine: nproc {info['nproc']}, {info['cpu']}; Python {info['python']}, torch "
        f"{info['torch']}, numpy {info['numpy']}, pika {info['pika']}, RabbitMQ "
        f"{info.get('rabbitmq', '?')}, Redis {info.get('redis', '?')}",
        f"mode: {'quick' if plan.quick else 'full'}",
    ]


def service_versions(info: dict[str, str]) -> None:
    try:
        info["redis"] = S.redis_connect(S.conns().redis_url).info("server")["redis_version"]
        conn = S.amqp_connect(S.conns().amqp_url, "bench-version", heartbeat=0)
        props = conn._impl.server_properties  # the broker announces its version at connect
        version = props.get("version", "?")
        info["rabbitmq"] = version.decode() if isinstance(version, bytes) else str(version)
        conn.close()
    except Exception as exc:  # versions are decoration; never fail the benchmark for them
        log(f"could not read service versions: {exc!r}")


DOC_TEXT = """\
What the whole system does on this machine: how fast one aggregator applies updates next to what
RabbitMQ alone carries, how many participants that is, what a participant spends outside its
local SGD, how long the default run takes to reach {target} accuracy next to centralized
training, and how it scales with N. The machine is shared and noisy (2 vCPU, other people's
experiments and tests run beside the benchmark), so every acceptance figure is a ratio to a
ceiling measured in the same run, each section prints the load average it started under, and
the scaling table shows how much CPU other processes took. Reproduce with:

```
python -m bench                  # full (8-10 min), rewrites this section
python -m bench --quick          # 2-3 min smoke version, prints only (--write-doc records it)
python -m bench --sections 1,3   # a subset, prints only
```

The exit code is 1 if an acceptance line is missed.

```
{table}
```

Acceptance (issue 7), from the run above:

| figure | required | measured | |
|---|---|---|---|
{accept}

How each figure is measured:

- **Capacity (1).** A pool of 16 encoded updates per θu (random sorted indices, values
  N(0, 1e-3), f32, exactly what `shared.wire.encode` produces) is stamped with a unique
  (participant, seq) per publish — header bytes and the msgpack `s` field, one copy, checked by
  decoding — so publishers spend no CPU on encoding. Three publisher processes (pika
  `SelectConnection`, persistent messages, asynchronous confirms, ≤ 1000 or 16 MB unconfirmed
  each) publish for the stated time. *Ceiling*: the same publishers and bytes into a plain
  durable quorum queue, drained by a pika `BlockingConnection` consumer that only acks
  (prefetch 1000, `multiple` ack every 100); end = last message received. *Aggregator*: a run
  with `rule = sum`, γ = 100, zero parameters, 30 participants and
  `python -m dssgd.aggregator --no-eval`; end = the moment the `version` key shows every confirmed
  update committed (polled every 2 ms). Both are end to end from the first publish, so they
  include draining any backlog; publishers, broker, Redis and the consumer share the 2 cores, as
  on a single-host deployment. "msgs/commit" = updates applied ÷ Lua commits (the `commits`
  counter). The *backlog drain* repeats both with the queue filled first and nobody publishing:
  the consumer side alone.
- **Participants sustained (2).** A participant needs one message per epoch, so the aggregator's
  end-to-end capacity at θu = 0.1 ÷ one participant's epochs per second (alone on the machine, so
  each would need its own core) is how many participants one aggregator keeps up with.
- **Overhead (3).** From the progress hash each participant writes after every epoch:
  `t_train` (seconds inside `LocalTrainer.epoch`), `t_epoch` (download to confirm) and
  `last_seen` (end of the epoch). The bench polls it every 10 ms, so it sees every participant
  right after its epoch 1 and gets the start of its first download as `last_seen − t_epoch`.
- **Time to accuracy (4).** Wall time from starting `dssgd run` to the `time` stamp of the first
  point of the aggregator's accuracy series at ≥ {target}; "previous eval" brackets the crossing
  from below. `dssgd run` forks its services after importing PyTorch once (`--launcher fork`,
  the default). The start-up line splits the time before the first update: the aggregator
  serving, the first epoch done, the workers hosting all their participants (from the run's log
  time stamps and the progress hash). Centralized:
  `python -c` running `shared.baselines.train_curve` on `union_indices` (the same 6,000 images),
  timed from process start to the evaluation after the first epoch at ≥ {target}, once with 1
  and once with 2 torch threads; the faster is the ceiling (with another process busy, two
  threads on two cores are several times slower).
- **Scaling (5).** `dssgd run --participants N --epochs E` (2 worker processes), E derived from
  section 2's single-participant rate so that each run trains for about 30 s, with a time limit
  as a guard; participant-epochs/s between 10 % and 90 % of all epochs (no start-up, no tail);
  queue depth = ready messages of `dssgd.<run>.updates` from a passive declare every 0.5 s
  ("unapplied" = Σ confirmed seq − version also counts what the aggregator has prefetched);
  CPU from `/proc/<pid>/stat` (utime + stime; the aggregator's main thread is the apply path,
  the rest of that process is its evaluator); "others" = busy time of the machine not accounted
  to the run, the broker or Redis.
"""


def write_doc(rep: Report, head: list[str]) -> None:
    table = "\n".join([*head, "", *rep.lines]).rstrip()
    accept = "\n".join(f"| {w} | {r} | {m} | {'met' if ok else '**missed**'} |"
                       for w, r, m, ok in rep.accept)
    body = f"{HEADER}\n\n" + DOC_TEXT.format(target=TARGET, table=table, accept=accept)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start = text.find(HEADER)
    kept = ""
    if start >= 0:
        rest = text[start + len(HEADER):]
        nxt = rest.find("\n## ")
        section, after = (rest, "") if nxt < 0 else (rest[:nxt + 1], rest[nxt + 1:])
        mark = section.find(END_MARK)
        if mark >= 0:
            kept = section[mark + len(END_MARK):].rstrip("\n")
        text = text[:start].rstrip("\n") + "\n\n" + after if after else text[:start]
        text = text.rstrip("\n") + "\n"
    text = text.rstrip("\n") + "\n\n" + body + "\n" + END_MARK + "\n" + kept.lstrip("\n")
    DOC.write_text(text.rstrip("\n") + "\n")
    log(f"wrote {DOC}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke version (2-3 minutes)")
    ap.add_argument("--sections", default="1,2,3,4,5,6", help="comma-separated subset of 1..6")
    ap.add_argument("--publishers", type=int, default=3, help="publisher processes (section 1)")
    ap.add_argument("--write-doc", action="store_true", help="record a --quick run in the doc")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    sections = {int(x) for x in args.sections.split(",") if x.strip()}
    plan = Plan.make(args.quick, args.publishers)
    info = S.machine_info()
    service_versions(info)
    head = header_lines(plan, argv, info)
    for line in head:
        print(line)
    print()
    rep = Report()
    t0 = time.time()
    results: dict[int, Any] = {}

    def run(number: int, fn: Any, *fn_args: Any) -> None:
        if number not in sections:
            return
        rep.add(f"[section {number}: load average {S.loadavg():.1f} before it started]")
        try:
            results[number] = fn(plan, rep, *fn_args)
        except Exception as exc:  # report and go on: the other sections still mean something
            rep.add(f"section {number} FAILED: {exc!r}")
            rep.add("")
            rep.check(f"section {number}", "runs", f"failed: {exc!r}"[:200], False)

    run(1, section_capacity)
    capacity = results[1][0.1][1].msg_per_s if 1 in results else None
    run(2, section_participants, capacity)
    run(3, section_overhead)
    run(4, section_tta)
    run(5, section_scaling, results.get(2))
    from bench.scale import section_scale

    run(6, section_scale)
    rep.add("Acceptance:")
    for what, required, measured, ok in rep.accept:
        rep.add(f"  {'met   ' if ok else 'MISSED'}  {what}: {measured} (required {required})")
    rep.add(f"(benchmark took {time.time() - t0:.0f} s)")
    if not args.no_doc and (not args.quick or args.write_doc) and sections >= {1, 2, 3, 4, 5}:
        write_doc(rep, head)
    return 0 if all(ok for *_, ok in rep.accept) else 1


if __name__ == "__main__":
    sys.exit(main())
