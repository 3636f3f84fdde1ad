"""Benchmarks of --secure two-server: message size, share generation, throughput, accuracy.

    python -m bench.secure throughput [--messages 400] [--theta-u 0.1] [--every 8]
    python -m bench.secure accuracy [--seeds 1 2 3] [--theta-u 0.1 0.01] [--epochs 10]

``throughput`` pre-encodes real-size sealed updates of the MNIST MLP, starts both share servers
(forked, each with its own private Redis) and measures (1) end to end: publish every message
with confirms while the servers run, until both have applied the last; (2) draining a backlog.
Take its figures under ``flock /work/bench.lock``. ``accuracy`` runs ``dssgd run`` with and
without ``--secure two-server`` for each seed and θu and prints the test accuracies.
Figures: docs/SECURE.md and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from dssgd.shared import secure, wire
from dssgd.shared.config import Connections
from dssgd.shared.selection import budget

from testing.runs import ROOT
from testing.secure import RedisServer, SecureRig, secure_config


def _bodies(rig: SecureRig, count: int, rng: np.random.Generator) -> tuple[list, list, float]:
    """(secure bodies, plaintext sizes, seconds of share generation + sealing per message)."""
    ch = rig.connect_sender()
    k = budget(rig.n, rig.cfg.theta_u)
    gamma = rig.cfg.effective_gamma
    out, plain, spent = [], [], 0.0
    for i in range(count):
        pid, seq = i % rig.cfg.participants, i // rig.cfg.participants + 1
        idx = np.sort(rng.choice(rig.n, size=k, replace=False)).astype(np.int64)
        vals = rng.uniform(-gamma, gamma, size=k).astype(np.float32)
        t0 = time.perf_counter()
        body = ch.encode(pid, seq, max(0, i - rig.cfg.participants), rig.n, idx, vals)
        spent += time.perf_counter() - t0
        out.append((pid, seq, body, vals))
        plain.append(len(wire.encode(wire.Update(rig.cfg.run_id, pid, seq, 0, rig.n, idx, vals))))
    return out, plain, spent / count


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_both(rig: SecureRig, last: int, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while rig.offsets() != (last, last):
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"servers at {rig.offsets()}, not {last}")
        time.sleep(0.01)
    return time.monotonic()


def throughput(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(1)
    results = {}
    for phase in ("end-to-end", "backlog"):
        a, b = RedisServer(), RedisServer()
        cfg = secure_config(participants=10, theta_u=args.theta_u, snapshot_every=args.every,
                            snapshot_ring=16)  # fmt: skip
        rig = SecureRig(Connections.from_env(), cfg, (a.url, b.url))
        try:
            rig.start_thread("a")  # registers the keys, then hands over to forked servers
            rig.start_thread("b")
            msgs, plain, gen = _bodies(rig, args.messages, rng)
            rig.stop_servers()
            if phase == "end-to-end":
                for role in secure.ROLES:
                    rig.start_process(role, max_batch=500)
                time.sleep(2.0)  # the servers are consuming (nothing to read yet)
            t0, first = time.monotonic(), 0
            for pid, seq, body, vals in msgs:
                rig.publish(body, pid, seq, vals)
            if phase == "backlog":
                for role in secure.ROLES:
                    rig.start_process(role, max_batch=500)
                # From the first commit of the slower server: its start-up is not throughput.
                while min(rig.offsets()) < 0:
                    time.sleep(0.005)
                t0 = time.monotonic()
                first = min(rig.offsets()) + 1
            t1 = _wait_both(rig, len(msgs) - 1)
            done = len(msgs) - (first if phase == "backlog" else 0)
            cpu = {role: _cpu_seconds(p.pid) for role, p in rig.procs.items()}
            ratio = [len(m[2]) / p for m, p in zip(msgs, plain, strict=True)]
            results[phase] = {
                "messages": len(msgs),
                "entries": budget(rig.n, cfg.theta_u),
                "seconds": t1 - t0,
                "updates_per_s": done / (t1 - t0),
                "bytes_secure": statistics.mean(len(m[2]) for m in msgs),
                "bytes_plain": statistics.mean(plain),
                "size_ratio": statistics.mean(ratio),
                "ms_share_and_seal": 1000 * gen,
                # CPU of each server process, start-up included, per message: the rate one
                # server would reach with a core of its own (the machine was shared).
                "server_cpu_ms_per_msg": {r: 1000 * c / len(msgs) for r, c in cpu.items()},
            }
            print(phase, json.dumps(results[phase]), flush=True)
        finally:
            rig.close()
            a.stop()
            b.stop()
    return results


def _dssgd_run(secure_mode: bool, seed: int, theta_u: float, args: argparse.Namespace) -> dict:
    runs = Path(tempfile.mkdtemp(prefix="dssgd-secure-acc-"))
    cmd = [sys.executable, "-m", "dssgd", "run", "--participants", str(args.participants),
           "--epochs", str(args.epochs), "--seed", str(seed), "--theta-u", str(theta_u),
           "--runs-dir", str(runs), "--json"]  # fmt: skip
    if secure_mode:
        cmd += ["--secure", "two-server"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    s = json.loads(out.stdout[out.stdout.index("{") :])
    return {"accuracy": s["accuracy"], "applied": s["updates_applied"],
            "bytes_per_update": s["bytes_up_per_update"], "wall": s["wall_seconds"]}  # fmt: skip


def accuracy(args: argparse.Namespace) -> dict:
    results: dict = {}
    for theta_u in args.theta_u:
        for mode in args.modes:
            accs = []
            for seed in args.seeds:
                r = _dssgd_run(mode == "secure", seed, theta_u, args)
                accs.append(r["accuracy"])
                print(f"θu {theta_u} {mode} seed {seed}: {json.dumps(r)}", flush=True)
            results[f"{theta_u}:{mode}"] = {"accuracies": accs, "mean": statistics.mean(accs)}
        if len(args.modes) < 2:
            continue
        gap = results[f"{theta_u}:secure"]["mean"] - results[f"{theta_u}:plain"]["mean"]
        results[f"{theta_u}:gap_points"] = 100 * gap
        print(f"θu {theta_u}: secure − plain = {100 * gap:+.2f} points", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--messages", type=int, default=400)
    t.add_argument("--theta-u", type=float, default=0.1)
    t.add_argument("--every", type=int, default=8, help="snapshot every K messages")
    acc = sub.add_parser("accuracy")
    acc.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    acc.add_argument("--theta-u", type=float, nargs="+", default=[0.1, 0.01])
    acc.add_argument("--epochs", type=int, default=10)
    acc.add_argument("--participants", type=int, default=10)
    acc.add_argument("--modes", nargs="+", default=["plain", "secure"], choices=["plain", "secure"])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = throughput(args) if args.what == "throughput" else accuracy(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
