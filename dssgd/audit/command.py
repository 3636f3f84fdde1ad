"""``dssgd audit``: turn the options into a sweep, run it, print and write the report."""

from __future__ import annotations

import argparse
import itertools
import math
import sys

from dssgd.audit.pipeline import Point
from dssgd.audit.scenario import Setting
from dssgd.shared.errors import ConfigError


def _numbers(flag: str, raw: str) -> list[float]:
    out = []
    for part in raw.split(","):
        try:
            v = float(part)
        except ValueError:
            raise ConfigError(f"{flag}: {part.strip()!r} is not a number") from None
        if not math.isfinite(v):
            raise ConfigError(f"{flag}: {part.strip()!r} is not a finite number")
        out.append(v)
    return out


def _dp(raw: str) -> list[tuple[str, float | None]]:
    out: list[tuple[str, float | None]] = []
    for part in raw.split(","):
        name, _, eps = part.strip().partition(":")
        if name == "none" and not eps:
            out.append(("none", None))
        elif name in ("svt", "dpsgd") and eps:
            out.append((name, _numbers("--dp", eps)[0]))
        else:
            raise ConfigError(f"--dp: {part.strip()!r}: give none, svt:EPS or dpsgd:EPS")
    return out


def points(args: argparse.Namespace) -> list[Point] | None:
    """The grid the options ask for (every combination), or None for the default sweep."""
    given = [args.theta_u, args.selection, args.gamma, args.dp, args.state]
    if all(v is None for v in given):
        return None
    theta = _numbers("--theta-u", args.theta_u) if args.theta_u else [1.0]
    rules = [r.strip() for r in args.selection.split(",")] if args.selection else ["topk"]
    gammas: list[float | None] = _numbers("--gamma", args.gamma) if args.gamma else [None]  # type: ignore[assignment]
    dps = _dp(args.dp) if args.dp else [("none", None)]
    states = [s.strip() for s in args.state.split(",")] if args.state else ["trained"]
    out = [
        Point(state, t, rule, g, dp, eps)
        for state, t, rule, g, (dp, eps) in itertools.product(states, theta, rules, gammas, dps)
    ]
    for p in out:
        p.check()
    return out


def setting(args: argparse.Namespace) -> Setting:
    s = Setting(
        task=args.task,
        participants=args.participants,
        shard_size=args.shard_size,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        non_members=args.non_members,
        run_epochs=args.run_epochs,
        value_coding=args.value_coding,
        bootstrap=args.bootstrap,
    )
    s.check()
    if args.selftest_samples < 0 or 0 < args.selftest_samples < 100:
        raise ConfigError(f"--selftest-samples must be 0 or >= 100, got {args.selftest_samples}")
    if args.run_epochs < 1:
        raise ConfigError(f"--run-epochs must be >= 1, got {args.run_epochs}")
    return s


def cmd_audit(args: argparse.Namespace) -> int:
    from dssgd.audit import report, sweep

    grid = points(args)
    s = setting(args)
    audit = sweep.run(
        s, list(sweep.DEFAULT_POINTS) if grid is None else grid, args.selftest_samples
    )
    print(report.text(audit))
    if args.json:
        print(f"JSON: {report.write_json(audit, args.json)}")
    if args.png:
        try:
            print(f"PNG: {report.write_png(audit, args.png)}")
        except ValueError as exc:
            print(f"dssgd: no PNG written: {exc}", file=sys.stderr)
    return 0
