"""CPU seconds of every process of one `dssgd run` (and of the Redis and RabbitMQ servers), read
from /proc every 0.2 s: where a default run's CPU goes (docs/BENCHMARKS.md, issue 18).

    python -m bench.run_cpu [--root CHECKOUT] [dssgd run options]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        pass
    return [pid] + [q for k in kids for q in tree(k)]


def role(pid: int, parent: int) -> str:
    if pid == parent:
        return "dssgd run"
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = "?"
    return f"child {pid} ({comm})"


def main(argv: list[str]) -> int:
    root = ROOT
    if argv[:1] == ["--root"]:
        root, argv = Path(argv[1]), argv[2:]
    servers = {}
    for name in ("redis-server", "beam.smp"):
        out = subprocess.run(["pgrep", "-o", name], capture_output=True, text=True).stdout.split()
        if out:
            servers[name] = (int(out[0]), cpu(int(out[0])) or 0.0)
    run_id = "cpu-" + uuid.uuid4().hex[:6]
    t0 = time.time()
    p = subprocess.Popen(
        [str(root / ".venv/bin/dssgd"), "run", "--run-id", run_id, *argv],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last: dict[int, float] = {}
    while p.poll() is None:
        for q in tree(p.pid):
            c = cpu(q)
            if c is not None:
                last[q] = c
        time.sleep(0.2)
    print(f"run {run_id}: wall {time.time() - t0:.1f} s, exit {p.returncode}")
    for q, c in sorted(last.items(), key=lambda x: -x[1]):
        print(f"  {c:6.2f} CPU-s  {role(q, p.pid)}")
    for name, (pid, before) in servers.items():
        print(f"  {(cpu(pid) or 0.0) - before:6.2f} CPU-s  {name} (shared server)")
    # Benchmarks leave nothing behind: the run's keys, queues and folder go.
    subprocess.run([str(root / ".venv/bin/dssgd"), "delete", run_id], cwd=root,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    shutil.rmtree(root / "runs" / run_id, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
