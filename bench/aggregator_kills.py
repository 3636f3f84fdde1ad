"""A default `dssgd run` of 60 epochs whose aggregator is SIGKILLed every 2.5 s (issue 17).

    python -m bench.aggregator_kills                # 5 kills, the last after the participants
    python -m bench.aggregator_kills --kills 6 --repeat 3

Every 2.5 s the aggregator named in the run folder's ``pids.json`` is killed, if it has been up
for at least 1.2 s (longer than the launchers' 1 s start time, so the kills are of a started
service, not a crash loop). The last kill waits until every participant has finished, so it
lands in the drain. Afterwards the applied log is read back: `dssgd run` must exit 0 only if
every one of the 10 × 60 confirmed updates was applied exactly once (and otherwise exit 75
naming what waits). Uses the shared servers with a run of its own (``bench-kills-…``), removed
at the end. Exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dssgd.shared.config import Connections
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

ROOT = Path(__file__).resolve().parent.parent
PERIOD, UP_AT_LEAST = 2.5, 1.2
PARTICIPANTS, EPOCHS = 10, 60


@dataclass
class Outcome:
    kills: list[tuple[float, str, int]] = field(default_factory=list)  # (t, phase, version)
    code: int = -1
    summary: dict[str, Any] = field(default_factory=dict)
    applied_rows: int = 0
    distinct: int = 0
    doubled: int = 0
    missing: int = 0
    wall: float = 0.0

    @property
    def ok(self) -> bool:
        full = self.distinct == PARTICIPANTS * EPOCHS and not self.doubled and not self.missing
        return (self.code == 0) == full and self.code in (0, 75)


def _aggregator(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "pids.json").read_text()).get("aggregator")
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def one_run(  # long: one scenario, in order
    kills: int, conns: Connections, runs: Path, start_at: float = 0.0
) -> Outcome:
    run_id = f"bench-kills-{uuid.uuid4().hex[:8]}"
    run_dir = runs / run_id
    store = RunStore(redis_connect(conns.redis_url), run_id)
    argv = [sys.executable, "-m", "dssgd", "run", "--run-id", run_id, "--runs-dir", str(runs)]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*argv, "--epochs", str(EPOCHS), "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = Outcome()
    first_seen: dict[int, float] = {}
    killed: set[int] = set()
    next_tick = time.monotonic() + PERIOD
    try:
        while proc.poll() is None and len(out.kills) < kills:
            time.sleep(0.05)
            pid = _aggregator(run_dir)
            now = time.monotonic()
            if pid is None or pid in killed or not _alive(pid):
                continue
            first_seen.setdefault(pid, now)
            try:
                finished = len(store.finished())
                epochs = sum(int(p.get("epochs", 0)) for p in store.all_progress(10).values())
            except Exception:  # the run may not exist yet
                finished = epochs = 0
            if epochs < start_at * PARTICIPANTS * EPOCHS:
                continue
            last = len(out.kills) == kills - 1
            if now < next_tick or now - first_seen[pid] < UP_AT_LEAST:
                continue
            if last and finished < PARTICIPANTS:
                continue  # the last kill lands after every participant finished
            version = int(store.r.get(store.keys.version) or 0)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            phase = "drain" if finished >= PARTICIPANTS else "training"
            out.kills.append((now - t0, phase, version))
            next_tick = now + PERIOD
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    out.wall = time.monotonic() - t0
    out.code = proc.returncode
    try:
        out.summary = json.loads(stdout)
    except ValueError:
        print(stderr[-3000:], file=sys.stderr)
    rows = Counter(tuple(r.split(":")[:2]) for r in store.applied_log())
    out.applied_rows = sum(rows.values())
    out.distinct = len(rows)
    out.doubled = sum(1 for n in rows.values() if n > 1)
    want = {(str(p), str(s)) for p in range(PARTICIPANTS) for s in range(1, EPOCHS + 1)}
    out.missing = len(want - set(rows))
    subprocess.run([*argv[:3], "delete", run_id], cwd=ROOT, capture_output=True, check=False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5, help="4 to 6 in the issue's scenario")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--start-at",
        type=float,
        default=0.0,
        help="first kill once this fraction of the 600 epochs is confirmed (0.85: the kills' "
        "downtime meets the end of training, so the drain starts with a backlog)",
    )
    args = ap.parse_args(argv)
    conns = Connections.from_env()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-kills-") as tmp:
        for _ in range(args.repeat):
            results.append(one_run(args.kills, conns, Path(tmp), args.start_at))
    print(
        f"{'run':>3} {'kills':>5} {'in drain':>8} {'exit':>4} {'confirmed':>9} {'applied':>7} "
        f"{'distinct':>8} {'doubled':>7} {'missing':>7} {'restarts':>8} {'accuracy':>8} "
        f"{'wall':>7}  kill times (s)"
    )
    for i, r in enumerate(results, 1):
        s = r.summary
        drain = sum(1 for _, phase, _ in r.kills if phase == "drain")
        times = ", ".join(
            f"{t:.1f}" + (f"* (version {v})" if p == "drain" else "") for t, p, v in r.kills
        )
        confirmed, applied = s.get("confirmed_updates", "-"), s.get("updates_applied", "-")
        restarts = s.get("restarts", {}).get("aggregator", 0)
        acc = s.get("accuracy", float("nan"))
        print(
            f"{i:>3} {len(r.kills):>5} {drain:>8} {r.code:>4} {confirmed!s:>9} {applied!s:>7} "
            f"{r.distinct:>8} {r.doubled:>7} {r.missing:>7} {restarts!s:>8} {acc:>8.4f} "
            f"{r.wall:>6.1f}s  {times}"
        )
        if s.get("not_done"):
            print(f"    not done: {s['not_done']}")
    bad = [i for i, r in enumerate(results, 1) if not r.ok]
    print("* after every participant finished, at that global version (of 600)")
    print("verdict:", "ok" if not bad else f"FAILED in runs {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
