"""Scale benchmarks (issue 18): thousands of participants through the real RabbitMQ and Redis.

    python -m bench.scale                 # N = 1,000 × 600 (overlapping shards), N = 10,000 × 60
    python -m bench.scale --only 10000    # one of them
    python -m bench.scale --memory        # memory per hosted participant only (no services)
    python -m bench.scale --overhead      # MLP participant overhead outside SGD, asynchronous

Each run is ``dssgd run --participants N --shard-size S --epochs 3`` (2 worker processes, MLP,
θu = 0.1, asynchronous), watched from outside: every second the summed RSS of the whole process
tree of the command (``/proc``: the command, its forked aggregator and workers), the queue depth
(passive declare) and the global version. Reported: wall time, updates applied per second, peak
summed RSS, queue depth (max, mean), final test accuracy, and the time the first update was
applied. Summed RSS counts pages shared between the forked processes (PyTorch, the MNIST arrays)
once per process, so it overstates the memory in use; it is what the acceptance line asks for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pika.exceptions as pex
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import connect as amqp_connect

from bench import system as S

PAGE = os.sysconf("SC_PAGE_SIZE")
RUNS = {1000: 600, 10000: 60}  # N → images per participant (both overlap: N·S > 60,000)


def tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                text = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(text[text.rindex(")") + 2 :].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss(pid: int) -> int:
    """Resident bytes of one process (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class ScaleRecord:
    n: int
    shard: int
    epochs: int
    wall: float = 0.0
    summary: dict = field(default_factory=dict)  # type: ignore[type-arg]
    rss_peak: int = 0
    rss_by_process_at_peak: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    first_applied: float | None = None
    load: float = 0.0

    @property
    def updates_per_s(self) -> float:
        applied = self.summary.get("updates_applied", 0)
        return applied / self.wall if self.wall else 0.0


def run_scale(n: int, shard: int, epochs: int = 3, time_limit: float = 900.0) -> ScaleRecord:
    rec = ScaleRecord(n, shard, epochs, load=S.loadavg())
    run_id = S.new_id(f"n{n}")
    runs_dir = tempfile.mkdtemp(prefix="bench-scale-")
    c = S.conns()
    store = S.RunStore(S.redis_connect(c.redis_url), run_id)
    args = [
        "--participants",
        str(n),
        "--shard-size",
        str(shard),
        "--epochs",
        str(epochs),
        "--time-limit",
        str(time_limit),
    ]
    err = Path(runs_dir) / "stderr.log"
    t0 = time.time()
    with err.open("wb") as err_f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dssgd",
                "run",
                "--run-id",
                run_id,
                "--runs-dir",
                runs_dir,
                "--json",
                *args,
            ],
            cwd=S.ROOT,
            stdout=subprocess.PIPE,
            stderr=err_f,
        )
    amqp = amqp_connect(c.amqp_url, "bench-scale", heartbeat=0)
    try:
        while proc.poll() is None:
            sizes = [rss(p) for p in tree(proc.pid)]
            if sum(sizes) > rec.rss_peak:
                rec.rss_peak, rec.rss_by_process_at_peak = sum(sizes), sorted(sizes, reverse=True)
            with contextlib.suppress(pex.ChannelClosedByBroker, pex.AMQPError):
                ch = amqp.channel()
                q = ch.queue_declare(AmqpNames(run_id).queue, passive=True)
                rec.depth.append(q.method.message_count)
                ch.close()
            if rec.first_applied is None and int(store.r.get(store.keys.version) or 0) > 0:
                rec.first_applied = time.time() - t0
            time.sleep(1.0)
        out = proc.stdout.read() if proc.stdout else b""
        rec.wall = time.time() - t0
        with contextlib.suppress(ValueError):
            rec.summary = json.loads(out)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        with contextlib.suppress(Exception):
            amqp.close()
        S.delete_run(run_id)
        if proc.returncode != 0:
            print(err.read_text(errors="replace")[-3000:], file=sys.stderr)
        shutil.rmtree(runs_dir, ignore_errors=True)
    return rec


def memory_per_participant(count: int = 2000, shard: int = 60) -> dict[str, float]:
    """RSS added by hosting ``count`` light participants in this process: first their examples
    (rows of the one shared tensor), then the participants themselves; no services needed."""
    import torch
    from dssgd.shared.config import RunConfig
    from dssgd.shared.tasks import context_for, load_task
    from dssgd.worker.participant import Participant, SharedModel

    torch.set_num_threads(1)
    cfg = RunConfig(run_id="bench-memory", participants=count * 5, shard_size=shard, epochs=3)
    task = load_task(cfg.task)
    shared = SharedModel(task, cfg)
    task.local_data(context_for(cfg, 0))  # MNIST loaded, the shared tensor allocated
    base = rss(os.getpid())
    data = [task.local_data(context_for(cfg, p)) for p in range(count)]
    with_data = rss(os.getpid())
    parts = [
        Participant(
            p,
            cfg,
            None,
            None,
            None,
            data[p],
            task=task,
            shared=shared,  # type: ignore[arg-type]
            restored=({}, 0),
        )
        for p in range(count)
    ]
    del data
    after = rss(os.getpid())
    assert len(parts) == count
    return {
        "participants": count,
        "examples_mb": (with_data - base) / 1e6,
        "per_participant_kb": (after - with_data) / count / 1e3,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
    }


def overhead_mlp(epochs: int = 15) -> dict[str, float]:
    """MLP participant overhead outside SGD (asynchronous, 2 participants in 2 workers, 600
    images each): 1 − Σ t_train / Σ wall, wall from the first download to the last confirm."""
    args = ["--participants", "2", "--workers", "2", "--epochs", str(epochs)]
    rec = S.drive_run(args, "overhead-mlp", progress_every=0.01, watch=False)
    walls = [w for p in sorted(rec.final) if (w := rec.participant_wall(p)) is not None]
    train = sum(float(rec.final[p]["t_train"]) for p in sorted(rec.final))
    wall = sum(walls)
    return {
        "wall": wall,
        "train": train,
        "overhead": 1 - train / wall if wall else float("nan"),
        "accuracy": float(rec.summary.get("accuracy", float("nan"))),
        "busy": rec.machine_busy or 0.0,
    }


def table(rows: list[ScaleRecord]) -> list[str]:
    out = [
        "     N  images  epochs  wall s  updates  updates/s  first update s  peak RSS GB "
        "(largest processes, MB)  queue max/mean  accuracy  load"
    ]
    for r in rows:
        s = r.summary
        depth_mean = statistics.fmean(r.depth) if r.depth else 0.0
        top = ", ".join(f"{b / 1e6:.0f}" for b in r.rss_by_process_at_peak[:4])
        first = "-" if r.first_applied is None else f"{r.first_applied:.1f}"
        applied = s.get("updates_applied", 0)
        out.append(
            f"{r.n:6d}  {r.shard:6d}  {r.epochs:6d}  {r.wall:6.0f}  {applied:7d}"
            f"  {r.updates_per_s:9.1f}  {first:>14}  {r.rss_peak / 1e9:11.2f} "
            f"({top})  {max(r.depth, default=0):5d}/{depth_mean:<7.0f}  "
            f"{s.get('accuracy', float('nan')):8.4f}  {r.load:4.1f}"
        )
        if s.get("stop_reason"):
            out.append(f"        stopped because {s['stop_reason']}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", type=int, choices=sorted(RUNS), help="one N of the table")
    ap.add_argument("--memory", action="store_true", help="memory per participant only")
    ap.add_argument("--overhead", action="store_true", help="MLP overhead outside SGD only")
    ap.add_argument("--time-limit", type=float, default=900.0, help="per run (dssgd run's)")
    args = ap.parse_args(argv)
    info = S.machine_info()
    print(
        f"machine: nproc {info['nproc']}, {info['cpu']}; torch {info['torch']}; load "
        f"{S.loadavg():.1f}; {time.strftime('%Y-%m-%d %H:%M %Z')}",
        flush=True,
    )
    if args.memory:
        print(json.dumps(memory_per_participant()), flush=True)
        return 0
    if args.overhead:
        print(json.dumps(overhead_mlp()), flush=True)
        return 0
    rows = []
    for n, shard in RUNS.items():
        if args.only in (None, n):
            rows.append(run_scale(n, shard, time_limit=args.time_limit))
            print("\n".join(table(rows[-1:])), flush=True)
    print("\n".join(table(rows)))
    ok = all(r.summary.get("accuracy", 0) >= 0.93 and r.rss_peak <= 4e9 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())


def section_scale(plan, rep) -> None:  # type: ignore[no-untyped-def]
    """Section 6 of ``python -m bench``: the scale table (the 10,000 run only in full mode)."""
    rows = [run_scale(n, s) for n, s in RUNS.items() if not plan.quick or n == 1000]
    rep.add(
        "6. Scale (issue 18): `dssgd run --participants N --shard-size S --epochs 3` (MLP, async,"
    )
    rep.add("   async, 2 worker processes); peak RSS = summed over the process tree,")
    rep.add("   sampled every second; queue = ready messages; updates/s = applied ÷ wall.")
    rep.add("")
    for line in table(rows):
        rep.add(line)
    rep.add("")
    for r in rows:
        rep.check(
            f"N = {r.n:,} × {r.shard}: accuracy, summed RSS",
            "≥ 0.93, ≤ 4 GB",
            f"{r.summary.get('accuracy', float('nan')):.4f}, {r.rss_peak / 1e9:.2f} GB "
            f"({r.wall:.0f} s)",
            r.summary.get("accuracy", 0) >= 0.93 and r.rss_peak <= 4e9,
        )
