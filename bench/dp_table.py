"""The DP results table of docs/RESULTS.md, from real runs through RabbitMQ and Redis.

    python -m bench.dp_table            # ≈ 15 min on 2 cores; rewrites the table in RESULTS.md

Default task (10 participants × 600 MNIST images, the MLP). Rows: standalone (one participant
alone, in-process), the non-private run, record-level DP-SGD at total ε ∈ {1, 2, 4, 8} per
participant (δ = 1e-5) with the levers chosen by bench/dp_levers.py, and the paper's SVT at
ε/c 10 and 100 with the honest ε it costs (PLD, the tightest valid bound the participants
report). Async
and round robin. Each `dssgd run` is deleted after its figures are read.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from dssgd.shared.baselines import standalone
from dssgd.shared.config import Connections, RunConfig
from dssgd.shared.data import load_mnist
from dssgd.shared.store import RunStore
from dssgd.shared.store import connect as redis_connect

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "RESULTS.md"
BEGIN, END = "<!-- dp-table:begin -->", "<!-- dp-table:end -->"
COMMAND = "python -m bench.dp_table"

# The DP-SGD levers (bench/dp_levers.py): large Poisson batches, few steps, clip C = 1, θu = 1.
DPSGD = ["--batch-size", "120", "--lr", "0.5", "--epochs", "5", "--dp-clip", "1", "--theta-u", "1"]
ORDERS = ("async", "round-robin")


def run(options: list[str]) -> dict[str, Any]:
    """One `dssgd run --json`; its summary plus the ε every participant reports, then delete."""
    run_id = f"dptable-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dssgd", "run", "--run-id", run_id, "--runs-dir", tmp,
               "--json", "--time-limit", "1800", *options]  # fmt: skip
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"{run_id} failed (exit {res.returncode}): {res.stderr[-1500:]}")
        summary = json.loads(res.stdout)
    cfg_n = summary["participants"]
    store = RunStore(redis_connect(Connections.from_env().redis_url), run_id)
    progress = store.all_progress(cfg_n)
    eps = [float(p["dp_total"]) for p in progress.values() if "dp_total" in p]
    bounds = sorted({p.get("dp_bound", "basic") for p in progress.values() if "dp_total" in p})
    sigma = {p["dp_sigma"] for p in progress.values() if "dp_sigma" in p}
    subprocess.run([sys.executable, "-m", "dssgd", "delete", run_id], capture_output=True)
    return {
        "accuracy": summary["accuracy"],
        "epsilon_max": max(eps) if eps else None,
        "bound": ",".join(bounds) or None,
        "sigma": float(sigma.pop()) if sigma else None,
        "seconds": round(time.monotonic() - t0, 1),
    }


def rows(quick: bool) -> list[dict[str, Any]]:
    eps_list = (8.0,) if quick else (1.0, 2.0, 4.0, 8.0)
    out: list[dict[str, Any]] = []
    cfg = RunConfig(model="mlp")
    alone = standalone(cfg, load_mnist(cfg.data), cfg.epochs, 0)
    out.append({"label": "standalone (one participant, 30 epochs)", "order": "-",
                "accuracy": alone.final, "epsilon_max": None, "bound": None})  # fmt: skip
    plan: list[tuple[str, list[str]]] = [("non-private (defaults, 30 epochs)", [])]
    plan += [("non-private, DP-SGD levers (B 120, lr 0.5, 5 epochs)", DPSGD)]
    plan += [(f"DP-SGD ε = {e:g}", [*DPSGD, "--dp-mechanism", "dpsgd", "--dp-epsilon", str(e)])
             for e in eps_list]  # fmt: skip
    plan += [(f"SVT ε/c = {v:g} (θu 0.1)", ["--dp-eps-per-value", str(v)]) for v in (10.0, 100.0)]
    for order in ORDERS:
        for label, opts in plan:
            r = run(["--order", order, *opts])
            r.update(label=label, order=order)
            print(json.dumps(r), file=sys.stderr, flush=True)
            out.append(r)
    return out


def table(rs: list[dict[str, Any]]) -> str:
    lines = [f"Reproduce: `{COMMAND}` (real runs through RabbitMQ and Redis; δ = 1e-5).", "",
             "| setting | order | test accuracy | ε per participant (bound) | σ |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rs:
        eps = "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.4g} ({r['bound']})"
        sigma = "-" if r.get("sigma") is None else f"{r['sigma']:.3f}"
        lines.append(f"| {r['label']} | {r['order']} | {r['accuracy']:.4f} | {eps} | {sigma} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ε = 8 only (a check, not the table)")
    ap.add_argument("--no-write", action="store_true", help="print, do not rewrite RESULTS.md")
    args = ap.parse_args()
    rs = rows(args.quick)
    text = table(rs)
    print(text)
    (ROOT / "docs" / "results-dp.json").write_text(json.dumps(rs, indent=1) + "\n")
    if not args.no_write:
        doc = RESULTS.read_text()
        block = f"{BEGIN}\n{text}\n{END}"
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        doc = pattern.sub(lambda _: block, doc) if BEGIN in doc else doc + "\n" + block + "\n"
        RESULTS.write_text(doc)


if __name__ == "__main__":
    main()
