"""Membership inference against one DP-SGD update, run after run: the figures of docs/AUDIT.md.

The audit's DP-SGD rows change from run to run (the noise comes from the OS CSPRNG, as in a
worker), so one row says little about a weak signal. This repeats the audited update at each ε
with fresh noise and prints, per run and score, the AUC [95 % CI] and TPR at 1 % FPR over all
600 members, the AUC of the members Poisson sampling never drew (they took no part in the
update, so must sit at chance) and of those it drew, then the mean over runs beside what the
DP guarantee allows one update (dssgd/audit/dpbound.py).

With ``--same-data`` every run audits the same 600 members against the same non-members and
only the noise changes: a fixed member set's own deviation from the population is then common
to every run, and the runs' spread understates the uncertainty. By default run k uses seed k
(another partition, another trained model), so the runs are independent replicates.

    flock -x /work/bench.lock .venv/bin/python -m bench.audit_dpsgd --runs 8 --eps 8,1
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from dssgd.audit import membership, sweep
from dssgd.audit.pipeline import Point
from dssgd.audit.scenario import Setting, load


def _row(eps: float, run: int, r: sweep.PointResult) -> list[dict[str, float | str]]:
    out: list[dict[str, float | str]] = []
    for name, m in r.membership.items():
        if isinstance(m, str):
            continue
        parts = r.by_draws.get(name, {})
        nan = membership.Estimate(float("nan"), float("nan"), float("nan"))
        never, drawn = parts.get("never drawn"), parts.get("drawn")
        null = r.null_membership[name]
        rec = {
            "score": name,
            "auc": m.auc.value,
            "tpr": m.tpr[0.01].value,
            "never_auc": never.auc.value if never else nan.value,
            "never_tpr": never.tpr[0.01].value if never else nan.value,
            "drawn_auc": drawn.auc.value if drawn else nan.value,
            "null_auc": null.auc.value,
            "null_tpr": null.tpr[0.01].value,
        }
        print(
            f"ε {eps:g} run {run}  {name:18s}  AUC {m.auc}  TPR@1% {m.tpr[0.01]}"
            f"  | never drawn ({never.members if never else 0}) AUC {rec['never_auc']:.3f}"
            f" TPR {rec['never_tpr']:.1%}; drawn AUC {rec['drawn_auc']:.3f}"
            f"  | null AUC {null.auc.value:.3f} TPR {null.tpr[0.01].value:.1%}",
            flush=True,
        )
        out.append(rec)
    return out


def _summary(eps: float, rows: list[dict[str, float | str]]) -> None:
    for name in dict.fromkeys(str(r["score"]) for r in rows):
        mine = [r for r in rows if r["score"] == name]

        def col(key: str, rows: list[dict[str, float | str]] = mine) -> list[float]:
            return [float(r[key]) for r in rows]

        def ms(key: str) -> str:
            v = col(key)
            return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) / math.sqrt(len(v)):.3f}"

        tpr = col("tpr")
        print(
            f"ε {eps:g} {name}, {len(mine)} runs (mean ± s.e.): AUC {min(col('auc')):.3f}-"
            f"{max(col('auc')):.3f}, mean {ms('auc')}; never drawn {ms('never_auc')}; drawn "
            f"{ms('drawn_auc')}; null {ms('null_auc')}; TPR@1% {min(tpr):.1%}-{max(tpr):.1%}, "
            f"mean {statistics.mean(tpr):.2%}, above 2 % in {sum(t > 0.02 for t in tpr)}; "
            f"never drawn TPR mean {statistics.mean(col('never_tpr')):.2%}; null TPR mean "
            f"{statistics.mean(col('null_tpr')):.2%}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--eps", default="8,1", help="total ε of the run, comma-separated")
    ap.add_argument("--run-epochs", type=int, default=30)
    ap.add_argument("--same-data", action="store_true", help="only the noise changes")
    ap.add_argument("--state", default="trained", choices=("trained", "initial"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # as sweep.run does
    t0 = time.perf_counter()
    scenarios = {}
    for run in range(1 if args.same_data else args.runs):
        scenarios[run] = load(Setting(seed=1 + run, run_epochs=args.run_epochs))
    first = scenarios[0]
    print(
        f"mnist-mlp, {len(first.members)} members, {len(first.non_members)} non-members, "
        f"{args.state} model, {args.run_epochs}-epoch run, "
        f"seeds {'1' if args.same_data else f'1-{args.runs}'}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for eps in (float(e) for e in args.eps.split(",")):
        rows, bound = [], None
        for run in range(args.runs):
            scn = scenarios.get(run, first)
            r = sweep.run_point(scn, Point(args.state, 1.0, dp="dpsgd", eps=eps))
            rows += _row(eps, run, r)
            bound = r.dp_bound
        _summary(eps, rows)
        print(f"ε {eps:g} DP bound on one update: {bound}")
    print(f"{time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
