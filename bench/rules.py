"""Which server update rule for asynchronous mode? Real runs through RabbitMQ and Redis.

    python -m bench.rules [--epochs 30] [--seeds 1 2]

For each rule (the paper's raw sum, 1/N scaling, staleness weighting) runs the default
configuration in asynchronous order and reports the participant-epochs and wall time to reach
0.93 test accuracy, and the final accuracy; round robin with the raw sum is the reference.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dssgd.shared.errors import DssgdError

from dssgd.experiment import measured_run

TARGET = 0.93


def one(order: str, rule: str, epochs: int, seed: int, extra: list[str]) -> dict[str, object]:
    options = ["--order", order, "--rule", rule, "--epochs", str(epochs), "--seed", str(seed),
               "--eval-interval", "0.25", *extra]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        try:
            summary, metrics = measured_run("bench-rules", options, Path(tmp))
        except DssgdError as exc:
            raise SystemExit(str(exc)) from exc
    n = summary["participants"]
    hit = next((m for m in metrics if m["accuracy"] >= TARGET), None)
    return {
        "order": order,
        "rule": rule,
        "seed": seed,
        "epochs_to_target": round(hit["version"] / n, 1) if hit else None,
        "seconds_to_target": round(hit["elapsed"], 1) if hit else None,
        "final_accuracy": round(summary["accuracy"], 4),
        "mean_staleness": round(summary["mean_staleness"], 2),
        "wall_seconds": round(summary["wall_seconds"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("extra", nargs="*", help="more `dssgd run` options, after --")
    args = ap.parse_args()
    cases = [("round-robin", "sum"), ("async", "sum"), ("async", "mean"), ("async", "staleness")]
    print(
        f"{'order':<12} {'rule':<10} {'seed':>4} {'epochs→0.93':>12} {'s→0.93':>7} "
        f"{'final acc':>9} {'staleness':>9} {'wall s':>7}"
    )
    for order, rule in cases:
        for seed in args.seeds:
            r = one(order, rule, args.epochs, seed, args.extra)
            print(
                f"{order:<12} {rule:<10} {seed:>4} {r['epochs_to_target']!s:>12} "
                f"{r['seconds_to_target']!s:>7} {r['final_accuracy']:>9} "
                f"{r['mean_staleness']:>9} {r['wall_seconds']:>7}",
                flush=True,
            )


if __name__ == "__main__":
    main()
