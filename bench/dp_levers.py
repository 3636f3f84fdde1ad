"""In-process search of the DP-SGD levers (no servers): which settings reach the best accuracy at ε.

Simulates the round-robin run of `dssgd run --order round-robin --dp-mechanism dpsgd` in one
process: each participant in turn downloads the global parameters, runs its DP-SGD local epoch
(shared.dpsgd, σ derived by shared.accounting for the whole run), selects θu of its Δw by
magnitude, bounds it to ±γ and adds it (sum rule) or adds Δw/N (mean rule). Only for choosing the
levers; the table in docs/RESULTS.md comes from real runs (bench/dp_table.py).

    python -m bench.dp_levers --eps 8 --grid quick     # one line of JSON per setting
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import numpy as np
import torch
from dssgd.shared.accounting import noise_multiplier
from dssgd.shared.data import load_mnist, prepare, shard_indices
from dssgd.shared.dpsgd import DpSgdTrainer
from dssgd.shared.models import build_model, get_flat, set_flat
from dssgd.shared.selection import budget, select_top_k
from dssgd.shared.training import evaluate, labels_tensor

_BASE = {"batch": 120, "epochs": 5, "lr": 0.5, "clip": 1.0, "theta_u": 1.0, "rule": "sum"}
# Round 2: one lever at a time around the best of "quick" (B 120, 5 epochs, lr 0.5).
ROUND2 = [
    {**_BASE, "lr": 0.3},
    {**_BASE, "theta_u": 0.1},
    {**_BASE, "epochs": 3},
    {**_BASE, "batch": 60, "lr": 0.3},
    {**_BASE, "clip": 0.5, "lr": 1.0},
    {**_BASE, "clip": 0.3, "lr": 1.5},
    {**_BASE, "batch": 200, "lr": 1.0},
    {**_BASE, "rule": "mean", "lr": 2.0},
]

# Round 3: more steps at large batches (σ grows slower than the number of steps).
ROUND3 = [
    {**_BASE, "batch": 300, "epochs": 20, "lr": 0.5},
    {**_BASE, "batch": 300, "epochs": 10, "lr": 1.0},
    {**_BASE, "batch": 600, "epochs": 20, "lr": 2.0},
]
ROUNDS = {"round2": ROUND2, "round3": ROUND3}

GRIDS = {
    "quick": {
        "batch": [120, 300, 600],
        "epochs": [5, 10],
        "lr": [0.5, 2.0],
        "clip": [1.0],
        "theta_u": [1.0],
        "rule": ["sum"],
    },
    "wide": {
        "batch": [64, 120, 300, 600],
        "epochs": [3, 5, 10, 20],
        "lr": [0.2, 0.5, 1.0, 2.0, 4.0],
        "clip": [0.1, 1.0, 5.0],
        "theta_u": [1.0, 0.1],
        "rule": ["sum", "mean"],
    },
}


def simulate(
    eps: float,
    batch: int,
    epochs: int,
    lr: float,
    clip: float,
    theta_u: float,
    rule: str,
    participants: int = 10,
    shard: int = 600,
    delta: float = 1e-5,
    seed: int = 1,
) -> dict[str, float]:
    d = load_mnist()
    model = build_model("mlp", seed)
    w = get_flat(model).copy()
    q, steps = min(1.0, batch / shard), math.ceil(shard / batch)
    sigma = noise_multiplier(eps, delta, q, steps * epochs) if eps < math.inf else 0.0
    trainers = []
    for pid in range(participants):
        idx = shard_indices(d.train_y, pid, participants, shard, seed, None)
        x, y = prepare(d.train_x[idx], "mlp"), labels_tensor(d.train_y[idx])
        trainers.append(DpSgdTrainer(model, x, y, lr, batch, clip, sigma))
    n = w.size
    gamma = lr / 4  # the run's default γ (RunConfig.effective_gamma)
    for _ in range(epochs):
        for t in trainers:
            set_flat(model, w)
            t.epoch()
            delta_w = get_flat(model) - w
            chosen = np.arange(n) if theta_u >= 1 else select_top_k(delta_w, budget(n, theta_u))
            vals = np.clip(delta_w[chosen], -gamma, gamma)
            w[chosen] += vals / (participants if rule == "mean" else 1)
    set_flat(model, w)
    tx, ty = prepare(d.test_x, "mlp"), labels_tensor(d.test_y)
    return {"accuracy": evaluate(model, tx, ty).accuracy, "sigma": sigma}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, default=8.0)
    ap.add_argument("--grid", choices=[*sorted(GRIDS), *ROUNDS], default="quick")
    ap.add_argument("--budget-s", type=float, default=900.0, help="stop starting settings after")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared
    if args.grid in ROUNDS:
        settings = ROUNDS[args.grid]
    else:
        g = GRIDS[args.grid]
        settings = [dict(zip(g, combo, strict=True)) for combo in itertools.product(*g.values())]
    t0 = time.time()
    for kw in settings:
        if time.time() - t0 > args.budget_s:
            break
        t = time.time()
        r = simulate(args.eps, **kw)  # type: ignore[arg-type]
        print(json.dumps({"eps": args.eps, **kw, **r, "s": round(time.time() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
