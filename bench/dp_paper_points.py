"""Re-run the DP points of `dssgd experiment paper --preset quick` alone (after the SVT fix).

    python -m bench.dp_paper_points [--thetas 0.1 0.01]   # ≈ 1–2 min per point on 2 cores

Same settings as the preset (N = 20, 8 epochs, the paper's CNN, round robin), through RabbitMQ
and Redis; prints a markdown table with the paper's figure and the honest ε per participant.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dssgd.experiment import PAPER_DP, PRESETS, honest_epsilon, run_point


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thetas", type=float, nargs="+", default=[0.1])
    args = ap.parse_args()
    preset = PRESETS["quick"]
    print(
        "| DP point (round robin) | ours, after the fix | paper | ε per participant: basic / PLD |"
    )
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for theta in args.thetas:
            for eps in preset.dp_eps:
                opts = ["--order", "round-robin", "--theta-u", str(theta),
                        "--dp-eps-per-value", str(eps)]  # fmt: skip
                r = run_point(f"DP θu={theta} ε/c={eps}", preset, opts, Path(tmp))
                basic, tight = honest_epsilon(theta, eps, preset.epochs)
                ref = PAPER_DP.get(theta, {}).get(eps, "-")
                print(f"| θu = {theta}, ε/c = {eps} | {r['accuracy']:.4f} | {ref} | "
                      f"{basic:,.0f} / {tight:,.4g} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
