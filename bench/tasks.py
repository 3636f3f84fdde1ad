"""The breast-cancer task beside its baselines, IID and with label skew; real runs.

    python -m bench.tasks [--participants 10] [--epochs 30] [--seeds 1 2 3] [--write FILE.md]

For each partition (IID; Dirichlet label skew α = 0.3; one class per participant) and seed:
DSSGD through RabbitMQ and Redis (`dssgd run --task breast-cancer`, asynchronous and round
robin, θu = 0.1), centralized training on the union of the participants' parts, and standalone
training on each part alone (the mean over participants), every model judged on the task's
fixed 114 test patients.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from dssgd.experiment import measured_run
from shared.baselines import task_baseline
from shared.config import RunConfig
from shared.errors import DssgdError

# Partitioner specs (shared/partition.py), passed to every process as DSSGD_PARTITION.
PARTITIONS = {
    "IID": "iid",
    "label skew (Dirichlet α = 0.3)": "dirichlet:0.3",
    "one class per participant": "classes:1",
}
MARK = ("<!-- bench:tasks -->", "<!-- /bench:tasks -->")


def dssgd_point(n: int, epochs: int, seed: int, partition: str, extra: list[str]) -> float:
    options = ["--task", "breast-cancer", "--participants", str(n), "--epochs", str(epochs),
               "--seed", str(seed), "--eval-interval", "0.25", *extra]  # fmt: skip
    os.environ["DSSGD_PARTITION"] = partition  # the run's setting, read by `dssgd run`
    with tempfile.TemporaryDirectory() as tmp:
        try:
            summary, _ = measured_run("bench-tasks", options, Path(tmp))
        except DssgdError as exc:
            raise SystemExit(str(exc)) from exc
    return float(summary["accuracy"])


def one_seed(n: int, epochs: int, seed: int, partition: str) -> dict[str, float]:
    cfg = RunConfig(task="breast-cancer", participants=n, seed=seed, partition=partition)
    return {
        "centralized": task_baseline(cfg, list(range(n)), epochs),
        "standalone (mean of parts)": statistics.mean(
            task_baseline(cfg, [p], epochs) for p in range(n)
        ),
        "DSSGD async θu=0.1": dssgd_point(n, epochs, seed, partition, []),
        "DSSGD round-robin θu=0.1": dssgd_point(
            n, epochs, seed, partition, ["--order", "round-robin"]
        ),
    }


def table(results: dict[str, list[dict[str, float]]]) -> list[str]:
    settings = list(next(iter(results.values()))[0])
    lines = ["| setting | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for s in settings:
        cells = []
        for runs in results.values():
            vals = [r[s] for r in runs]
            spread = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.4f}{spread}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def write(path: Path, body: list[str]) -> None:
    text = path.read_text() if path.exists() else ""
    block = "\n".join([MARK[0], *body, MARK[1]])
    pattern = re.escape(MARK[0]) + ".*?" + re.escape(MARK[1])
    new = re.sub(pattern, lambda _: block, text, flags=re.S) if MARK[0] in text else (
        text.rstrip() + "\n\n" + block + "\n")  # fmt: skip
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--participants", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--write", type=Path, help="put the table into this Markdown file")
    args = ap.parse_args()
    t0 = time.monotonic()
    results = {
        name: [one_seed(args.participants, args.epochs, s, partition) for s in args.seeds]
        for name, partition in PARTITIONS.items()
    }
    body = [
        f"## Breast cancer (a clinical tabular task), N = {args.participants}",
        "",
        f"Command: `python -m bench.tasks --participants {args.participants} --epochs "
        f"{args.epochs} --seeds {' '.join(map(str, args.seeds))} --write docs/RESULTS.md` — "
        f"measured {time.strftime('%Y-%m-%d')}, {time.monotonic() - t0:.0f} s on 2 cores. "
        "The Wisconsin diagnostic set bundled with scikit-learn (built-in task `breast-cancer`): "
        "455 training patients split between the participants by the run's partitioner, 114 "
        "fixed test patients; an MLP 30-32-2, lr 0.2, batch 32, "
        f"{args.epochs} epochs everywhere (centralized: {args.epochs} passes over the pooled "
        "parts). Test accuracy, mean ± standard deviation over the seeds.",
        "",
        *table(results),
    ]
    print("\n".join(body))
    if args.write:
        write(args.write, body)


if __name__ == "__main__":
    main()
