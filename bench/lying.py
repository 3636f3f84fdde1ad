"""A participant that lies: what one of N participants sending poisoned updates every epoch
does to the default run's accuracy, with and without a per-message defence.

    python -m bench.lying                          # both attacks × {none, validation}, + clean
    python -m bench.lying --defence none --defence validation --defence norm --repeat 2

Each row is one `dssgd run` of the default configuration (10 participants × 600 MNIST images,
MLP, θu 0.1, asynchronous, 30 epochs each), with participant 9 replaced by a liar:

  flip   trains honestly, then publishes the sign-flipped step with every value at the
         maximal magnitude γ: -γ·sign(Δw) on its θu·n selected entries
  noise  publishes θu·n random entries of Gaussian noise with σ = γ, clipped to ±γ

Both pass today's bounds (±γ per value, θu·n entries): the aggregator cannot tell them from an
honest update by its shape. The defence (`--defence`, aggregator/defence.py) judges each
message on its own, as it is applied. Runs use the shared RabbitMQ and Redis (unique run ids).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LIAR = 9  # the last participant of the default run (the patch takes the last one)
ATTACKS = ("clean", "flip", "noise")


def _install_liar(attack: str) -> None:
    """Patch the worker's selection step for participant LIAR (the fork launcher's children
    inherit it: they are forked from this process)."""
    from dssgd.worker.participant import Participant

    honest = Participant.select

    def select(self: Participant, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices, values = honest(self, base)
        if self.pid != self.cfg.participants - 1 or attack == "clean":
            return indices, values
        gamma = np.float32(self.cfg.effective_gamma)
        if attack == "flip":
            return indices, (-gamma * np.sign(values)).astype(np.float32)
        k = indices.size
        rng = np.random.default_rng()
        idx = np.sort(rng.choice(self.layout.n_params, size=k, replace=False)).astype(np.int64)
        noise = np.clip(rng.normal(0.0, float(gamma), k), -gamma, gamma).astype(np.float32)
        return idx, noise

    Participant.select = select  # type: ignore[method-assign]


def _install_trace(path: str) -> None:
    """DSSGD_LYING_TRACE=FILE: every validation judgment as `participant cosine accepted`, to
    see what honest updates and the liar actually score."""
    from dssgd.aggregator import batch, defence

    apply_one, judge = batch._apply_one, defence.ValidationDescent.judge
    who = [-1]

    def traced_apply(state, v, *a, **kw):  # type: ignore[no-untyped-def]
        who[0] = v.update.participant
        return apply_one(state, v, *a, **kw)

    def traced_judge(self, w, indices, values):  # type: ignore[no-untyped-def]
        cos = self.score(w, indices, values)
        why = judge(self, w, indices, values)
        with open(path, "a") as f:
            f.write(f"{who[0]} {cos:.6f} {int(why is None)}\n")
        return why

    batch._apply_one = traced_apply  # type: ignore[assignment]
    defence.ValidationDescent.judge = traced_judge  # type: ignore[method-assign]


def one(attack: str, defence: str, seed: int, extra: list[str]) -> int:
    """Child: one run, its JSON summary on stdout."""
    from dssgd import cli

    _install_liar(attack)
    if os.environ.get("DSSGD_LYING_TRACE"):
        _install_trace(os.environ["DSSGD_LYING_TRACE"])
    runs = Path(tempfile.mkdtemp(prefix="dssgd-lying-"))
    run_id = f"lying-{attack}-{defence}-{uuid.uuid4().hex[:6]}"
    rc = cli.main(["run", "--run-id", run_id, "--runs-dir", str(runs), "--json",
                   "--defence", defence, "--seed", str(seed), *extra])
    # Who was refused: the aggregator logs every refusal with its participant and reason.
    log = (runs / run_id / "logs" / "aggregator.log").read_text(errors="replace")
    refused = re.findall(r"rejected message from (\d+) \((\w[\w-]*)\)", log)
    print(json.dumps({"refused_by": [[int(p), r] for p, r in refused]}))
    subprocess.run([sys.executable, "-m", "dssgd", "delete", run_id], cwd=ROOT,
                   capture_output=True, check=False)
    return rc


def _child(attack: str, defence: str, seed: int, extra: list[str]) -> dict:  # type: ignore[type-arg]
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "bench.lying", "--one", attack, defence, "--seed", str(seed),
         "--", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    start = res.stdout.find("{")
    if res.returncode != 0 or start < 0:
        raise SystemExit(f"run {attack}/{defence} failed ({res.returncode}): "
                         f"{res.stderr[-2000:]}")
    decoder = json.JSONDecoder()
    summary, end = decoder.raw_decode(res.stdout, start)
    extra_json, _ = decoder.raw_decode(res.stdout, res.stdout.index("{", end))
    summary.update(extra_json)
    summary["bench_seconds"] = time.monotonic() - t0
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--defence", action="append", choices=["none", "norm", "validation"])
    ap.add_argument("--attack", action="append", choices=ATTACKS)
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell (seeds 1..R)")
    ap.add_argument("--json", type=Path, help="also write every run's summary here")
    ap.add_argument("--one", nargs=2, metavar=("ATTACK", "DEFENCE"), help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="more `dssgd run` options (after --)")
    args = ap.parse_args(argv)
    if args.one:
        return one(args.one[0], args.one[1], args.seed, args.extra)
    defences = args.defence or ["none", "validation"]
    attacks = args.attack or list(ATTACKS)
    rows = []
    print(f"[lying] liar = participant {LIAR} of the default run; defences {defences}",
          flush=True)
    for attack in attacks:
        for defence in defences:
            for seed in range(1, args.repeat + 1):
                s = _child(attack, defence, seed, args.extra)
                refused = int(s.get("updates_rejected", 0))
                liar = s["participants"] - 1
                by = s.get("refused_by", [])
                liar_refused = sum(p == liar for p, _ in by)
                rows.append({"attack": attack, "defence": defence, "seed": seed,
                             "accuracy": s["accuracy"], "applied": s["updates_applied"],
                             "refused": refused, "liar_refused": liar_refused,
                             "honest_refused": len(by) - liar_refused,
                             "staleness": s.get("mean_staleness"), "wall": s["wall_seconds"]})
                print(f"[lying] {attack:<6} {defence:<10} seed {seed}: accuracy "
                      f"{s['accuracy']:.4f}, applied {s['updates_applied']}, refused {refused} "
                      f"(liar {liar_refused}, honest {len(by) - liar_refused}), mean staleness "
                      f"{s.get('mean_staleness')}, {s['wall_seconds']:.0f} s", flush=True)
    print()
    print(table(rows, defences))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def table(rows: list[dict], defences: list[str]) -> str:  # type: ignore[type-arg]
    head = f"{'attack (participant 9 of 10)':<30}" + "".join(
        f"{'accuracy, defence ' + d:>34}" for d in defences)
    lines = [head, "-" * len(head)]
    note = "refused L+H: the liar's updates + honest ones (of 30 + 270)"
    for attack in dict.fromkeys(r["attack"] for r in rows):
        cells = []
        for d in defences:
            acc = [r["accuracy"] for r in rows if r["attack"] == attack and r["defence"] == d]
            sel = [r for r in rows if r["attack"] == attack and r["defence"] == d]
            liar = sum(r["liar_refused"] for r in sel) / max(1, len(sel))
            honest = sum(r["honest_refused"] for r in sel) / max(1, len(sel))
            cell = (f"{np.mean(acc):.4f} (refused {liar:.0f}+{honest:.0f})" if acc else "-")
            cells.append(f"{cell:>34}")
        lines.append(f"{attack:<30}" + "".join(cells))
    return "\n".join([*lines, note])


if __name__ == "__main__":
    sys.exit(main())
