"""The ``dssgd audit`` sub-command's options (argparse only: ``dssgd --help`` stays fast)."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
Measure what a curious server (or, in the ordered modes, a curious participant) learns from
one participant's update, in-process, through dssgd's own training, selection, clipping, DP
and wire code (no RabbitMQ, no Redis). For each setting of the sweep it runs:

  reconstruction  first-layer ∂L/∂W_k ÷ ∂L/∂b_k; a record counts as recovered when a
                  reconstruction's cosine to it is > 0.9 AND above the never-seen control
                  (the best cosine an equal number of never-seen records reach)
  membership      loss drop and gradient alignment, members vs >= 5,000 non-members: AUC and
                  TPR at 1% / 0.1% FPR with bootstrap 95% intervals (chance: 0.5, TPR = FPR)
  label set       signs of the last-layer bias update of a participant holding 3 classes

Positive controls (a one-example update) show each attack has power on the model; the DP
self-test (shared/dpaudit.py) checks the mechanisms against their claim, with a broken
mechanism as its control. Each DP-SGD point also gets its bound: the most AUC and TPR any
attack on that one update can reach under the accountant's own guarantee. An attack that does
not apply says why (e.g. a convolutional first layer). Failed attacks are lower bounds on
leakage, not proofs of privacy: docs/AUDIT.md.
"""

EPILOG = """\
examples:
  dssgd audit                                   # the default sweep (mnist-mlp, < 2 min)
  dssgd audit --theta-u 1,0.1 --state trained   # your own grid: every combination of the lists
  dssgd audit --dp none,svt:1,dpsgd:8 --json audit.json --png audit.png
  dssgd audit --task breast-cancer              # any task: FILE.py:NAME, package.module:NAME

sweep lists are comma-separated; a list you do not give takes one value (θu 1, topk, the
run's γ = lr/4, no DP, the trained model). Exit codes: 0 done, 2 bad input.
"""


def add_audit_parser(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="measure what a server or participant learns from an update (no servers needed)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", default="mnist-mlp", help="the task to audit (default mnist-mlp)")
    g = p.add_argument_group("the sweep (default: a curated grid, docs/AUDIT.md)")
    g.add_argument("--theta-u", metavar="LIST", help="fractions shared, in (0, 1], e.g. 1,0.1")
    g.add_argument("--selection", metavar="LIST", help="selection rules: topk, threshold, pkg:Name")
    g.add_argument("--gamma", metavar="LIST", help="bounds γ on each value (default lr/4)")
    g.add_argument(
        "--dp",
        metavar="LIST",
        help="none, svt:EPS (EPS = the paper's ε/c per value), dpsgd:EPS (total ε of a run of "
        "--run-epochs epochs, σ derived as the worker does)",
    )
    g.add_argument("--state", metavar="LIST", help="model states: initial, trained")
    d = p.add_argument_group("the participant and its data")
    d.add_argument(
        "--participants",
        type=int,
        default=20,
        help="how the task splits its data: "
        "0 is audited, 1-5 train the 'trained' model, the rest are never-seen "
        "(default 20)",
    )
    d.add_argument("--shard-size", type=int, help="records per participant (default: the task's)")
    d.add_argument(
        "--non-members", type=int, default=5000, help="never-seen records (default 5000)"
    )
    d.add_argument("--lr", type=float, default=0.2, help="local learning rate (default 0.2)")
    d.add_argument("--batch-size", type=int, default=32, help="local batch size (default 32)")
    d.add_argument(
        "--run-epochs",
        type=int,
        default=30,
        help="run length DP-SGD's σ is derived for (default 30)",
    )
    d.add_argument(
        "--value-coding",
        choices=("f32", "f16", "q8"),
        default="f32",
        help="wire value coding (default f32)",
    )
    d.add_argument("--seed", type=int, default=1)
    o = p.add_argument_group("statistics and output")
    o.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
    o.add_argument(
        "--selftest-samples",
        type=int,
        default=4000,
        help="runs per input of the DP self-test (0: skip it; default 4000)",
    )
    o.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    o.add_argument(
        "--png", metavar="FILE", help="write the grid of true records and reconstructions"
    )
