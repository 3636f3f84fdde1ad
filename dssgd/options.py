"""Options and helpers every command shares: the run options, the service URLs, TOML run files,
participant lists. Imports none of the command modules, so each of them (and the parser) can use
it without an import cycle.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

from dssgd.shared.config import (
    DOWNLOADS,
    ORDERS,
    PRESETS,
    VALUE_CODINGS,
    Connections,
    RunConfig,
    env_overrides,
    from_mapping,
)
from dssgd.shared.errors import ConfigError
from dssgd.shared.rules import rules_help
from dssgd.shared.selection import selection_help

# `dssgd run` options that are not part of the stored run configuration, but may come from TOML
# like every other option (flags win).
RUN_COMMAND_OPTIONS = ("workers", "target_accuracy", "time_limit", "launcher", "runs_dir")

# (flag, RunConfig field, type, help)
RUN_OPTIONS: list[tuple[str, str, Any, str]] = [
    (
        "--task",
        "task",
        str,
        "what to train: FILE.py:NAME, package.module:NAME, or a registered name "
        "(mnist-mlp, the default; mnist-cnn; breast-cancer); see docs/TASKS.md",
    ),
    ("--model", "model", str, "mlp or cnn: the same as --task mnist-mlp / mnist-cnn"),
    ("--participants", "participants", int, "number of participants N (default 10)"),
    ("--shard-size", "shard_size", int, "training images per participant (default 600)"),
    ("--label-skew", "label_skew", float, "non-IID shards: Dirichlet α of the label mix"),
    ("--theta-u", "theta_u", float, "fraction of Δw uploaded per epoch, θu (default 0.1)"),
    ("--theta-d", "theta_d", float, "fraction of parameters downloaded per epoch, θd (default 1)"),
    ("--download", "download", str, f"which θd fraction: {', '.join(DOWNLOADS)}"),
    ("--selection", "selection", str, selection_help()),
    ("--lr", "lr", float, "local SGD learning rate (default 0.2)"),
    ("--batch-size", "batch_size", int, "local mini-batch size (default 32)"),
    ("--gamma", "gamma", float, "bound γ on each shared value (default lr/4)"),
    ("--tau", "tau", float, "threshold τ for --selection threshold (default γ/10)"),
    ("--order", "order", str, f"{', '.join(ORDERS)} (default async)"),
    ("--rule", "rule", str, rules_help()),
    ("--staleness-exponent", "staleness_exponent", float, "a in the weight (1+staleness)^-a"),
    ("--stat-decay", "stat_decay", float, "the paper's β: stat := β·stat per update (1 = off)"),
    (
        "--value-coding",
        "value_coding",
        str,
        f"wire precision of values: {', '.join(VALUE_CODINGS)}",
    ),
    ("--epochs", "epochs", int, "local epochs per participant (default 30, 0 = unlimited)"),
    ("--seed", "seed", int, "seed of initialisation, shards and shuffles (default 1)"),
    ("--data", "data", str, "data source: auto, hub, or a directory (MNIST IDX files, task data)"),
    ("--eval-interval", "eval_interval", float, "seconds between test-set evaluations"),
    ("--max-staleness", "max_staleness", int, "refuse updates older than this many versions"),
    ("--max-l2", "max_l2", float, "server-side L2 bound per update (larger ones are scaled down)"),
    ("--rate-limit", "rate_limit", float, "max updates per second per participant (server-side)"),
    ("--defence", "defence", str, "per-update defence against a lying participant: none, norm, "
     "validation (docs/RELIABILITY.md)"),
    ("--defence-margin", "defence_margin", float, "validation defence: the uphill cosine "
     "tolerated (default 0)"),
    (
        "--shards",
        "shards",
        int,
        "range shards S of the parameters in Redis (default 1): each under its own hash tag "
        "(its own Redis Cluster slot) with its own fenced commit, version and replay windows; "
        "staleness is counted per shard, and an update too large for one broker message "
        "(8 MiB) travels as one message per shard; at most one shard per chunk",
    ),
    ("--queue-max-length", "queue_max_length", int, "backlog bound of the update queue"),
    (
        "--queue-replicas",
        "queue_replicas",
        int,
        "quorum replicas of the update queue (default 0: every node of the broker's cluster)",
    ),
    (
        "--dp-eps-per-value",
        "dp_eps_per_value",
        float,
        "differential privacy with the sparse vector "
        "technique: ε per shared value (the paper's ε/c); off by default",
    ),
    (
        "--secure",
        "secure",
        str,
        "two-server: two non-colluding share servers hold additive secret shares of every "
        "update; neither sees a value (docs/SECURE.md)",
    ),
    ("--snapshot-every", "snapshot_every", int, "--secure: snapshot both servers every K messages"),
    ("--snapshot-ring", "snapshot_ring", int, "--secure: snapshots kept per server (lag bound)"),
    ("--dp-budget", "dp_budget", float, "total ε a participant may spend before it stops"),
    ("--dp-delta", "dp_delta", float, "δ of the reported (ε, δ) bound (default 1e-5)"),
    ("--dp-mechanism", "dp_mechanism", str, "svt (the paper's, default) or dpsgd (record-level)"),
    ("--dp-epsilon", "dp_epsilon", float, "DP-SGD: total ε per participant for the whole run"),
    ("--dp-clip", "dp_clip", float, "DP-SGD: per-example gradient clip norm C (default 1)"),
    (
        "--dp-noise-multiplier",
        "dp_noise_multiplier",
        float,
        "DP-SGD: noise multiplier σ (default: derived from --dp-epsilon, --dp-delta, --epochs)",
    ),
]


def add_connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("services")
    g.add_argument("--amqp-url", help="RabbitMQ URL (env DSSGD_AMQP_URL; default local guest)")
    g.add_argument("--redis-url", help="Redis URL (env DSSGD_REDIS_URL; default local)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training run (stored with the run; every process uses the same)")
    g.add_argument("--config", metavar="FILE", help="TOML file with any of these settings")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named set of hyper-parameters; 'paper' = lr 0.001, batch 1, γ 0.001, τ 0.0001",
    )
    for flag, field_name, tp, help_text in RUN_OPTIONS:
        g.add_argument(
            flag,
            dest=field_name,
            type=tp,
            metavar=field_name.upper().replace("_", "-") if tp is not str else None,
            help=help_text,
        )


def run_config_from_args(args: argparse.Namespace, run_id: str) -> RunConfig:
    """defaults < preset < config file < environment < flags."""
    values: dict[str, Any] = {}
    values.update(PRESETS.get(args.preset or "default", {}))
    if args.config:
        values.update(read_toml(args.config))
        split_run_command_options(values, args)
        if "preset" in values:
            values = {**PRESETS.get(values.pop("preset"), {}), **values}
    values.update(env_overrides(RunConfig))
    values.pop("run_id", None)
    values.pop("created", None)
    for _, field_name, _, _ in RUN_OPTIONS:
        v = getattr(args, field_name, None)
        if v is not None:
            values[field_name] = v
    values["run_id"] = run_id
    return from_mapping(RunConfig, values, "run configuration")


def env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    return int(raw) if raw and raw.isdigit() else None


def connections(args: argparse.Namespace) -> Connections:
    return Connections.from_env(args.amqp_url, args.redis_url)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings of a run file: top level or under [run]; any other section is a mistake."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    sections = sorted(k for k, v in data.items() if isinstance(v, dict) and k != "run")
    if sections:
        raise ConfigError(
            f"config file {p}: unknown section(s) {', '.join(f'[{s}]' for s in sections)}; "
            "settings go at top level or under [run]"
        )
    table = {k: v for k, v in data.items() if k != "run"}
    run = data.get("run", {})
    both = sorted(set(table) & set(run))
    if both:
        raise ConfigError(f"config file {p}: {', '.join(both)} given twice (top level and [run])")
    return {k.replace("-", "_"): v for k, v in {**table, **run}.items()}


def split_run_command_options(values: dict[str, Any], args: argparse.Namespace) -> None:
    """Move `dssgd run`'s own options (workers, time_limit, ...) from a TOML table onto args,
    unless a flag already set them."""
    for name in RUN_COMMAND_OPTIONS:
        if name in values:
            value = values.pop(name)
            if hasattr(args, name) and getattr(args, name) is None:
                setattr(args, name, value)


def parse_participants(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ConfigError(
            f"--participants must be comma-separated integers, got {text!r}"
        ) from None


def parse_slot(slot: str) -> tuple[int, int]:
    try:
        i, w = (int(x) for x in slot.split("/"))
    except ValueError:
        raise ConfigError(f"--slot must look like I/W (for example 0/2), got {slot!r}") from None
    if not 0 <= i < w:
        raise ConfigError(f"--slot {slot}: need 0 <= I < W")
    return i, w


def runs_dir(args: argparse.Namespace) -> Path:
    return Path(args.runs_dir)


def explicit_run_fields(args: argparse.Namespace) -> set[str]:
    """Run settings the user gave for this command: flags, TOML file, environment."""
    given = {f for _, f, _, _ in RUN_OPTIONS if getattr(args, f, None) is not None}
    if getattr(args, "config", None):
        given |= set(read_toml(args.config)) - set(RUN_COMMAND_OPTIONS)
    given |= set(env_overrides(RunConfig))
    if getattr(args, "preset", None):
        given |= set(PRESETS.get(args.preset, {}))
    return given - {"run_id", "created"}
