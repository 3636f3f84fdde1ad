"""What-if for section 1 of `python -m bench`: could a faster decoder reach 0.7 × the ceiling?

Runs, alternately and under the same load as section 1 (3 publisher processes, asynchronous
confirms, CNN-sized updates):

* *ceiling*: the ack-only consumer on a plain quorum queue;
* *aggregator*: ``python -m dssgd.aggregator --no-eval``, as shipped;
* *free decode*: the same aggregator with the index and value sections "decoded" for free
  (``shared.wire._decode_indices`` / ``_decode_values`` replaced by lookups of one
  pre-built array per size), which bounds what any decoder, native code included, could give.

    python -m bench.whatif [--rounds 2] [--seconds 6] [--thetas 0.01,0.1]

Prints msg/s and ratios; nothing here is a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import numpy as np

from bench import system as S

_INDICES: dict[int, np.ndarray] = {}
_VALUES: dict[int, np.ndarray] = {}


def _free_indices(_coding: int, _data: bytes, n: int, k: int, _low: int) -> np.ndarray:
    out = _INDICES.get(k)
    if out is None:
        rng = np.random.default_rng(k)
        out = _INDICES[k] = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    return out


def _free_values(_coding: Any, _data: bytes, k: int) -> tuple[np.ndarray, float]:
    out = _VALUES.get(k)
    if out is None:
        out = _VALUES[k] = np.zeros(k, np.float32)
    return out, 0.0


def aggregator_with_free_decode(argv: list[str]) -> int:
    """``python -m bench.whatif --serve ARGS``: the aggregator CLI with decoding patched out."""
    import dssgd.shared.wire as wire

    from dssgd.cli import main

    wire._decode_indices = _free_indices  # type: ignore[assignment]
    wire._decode_values = _free_values  # type: ignore[assignment]
    return main(["aggregator", *argv])


def main() -> int:
    if sys.argv[1:2] == ["--serve"]:
        return aggregator_with_free_decode(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m bench.whatif", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0, help="publishing time per measurement")
    ap.add_argument("--thetas", default="0.01,0.1")
    args = ap.parse_args()
    cfg = S.LoadSettings(duration=args.seconds)
    free = [sys.executable, "-m", "bench.whatif", "--serve"]
    info = S.machine_info()
    print(f"command: python -m bench.whatif {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: nproc {info['nproc']}, {info['cpu']}; load average {S.loadavg():.1f}")
    print("theta_u  round  ceiling msg/s  aggregator msg/s  free-decode msg/s  ratio  free ratio")
    for theta in (float(t) for t in args.thetas.split(",")):
        ratios: list[float] = []
        free_ratios: list[float] = []
        for r in range(args.rounds):
            ceil = S.measure_ceiling(cfg, theta, S.new_id("whatif")).msg_per_s
            agg = S.measure_aggregator(cfg, theta, S.new_id("whatif")).msg_per_s
            fre = S.measure_aggregator(cfg, theta, S.new_id("whatif"), command=free).msg_per_s
            ratios.append(agg / ceil)
            free_ratios.append(fre / ceil)
            print(f"{theta:7}  {r + 1:5}  {ceil:13.0f}  {agg:16.0f}  {fre:17.0f}  "
                  f"{agg / ceil:5.2f}  {fre / ceil:10.2f}", flush=True)
        print(f"{theta:7}  median ratio {statistics.median(ratios):.2f}, with free decoding "
              f"{statistics.median(free_ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
