"""Settings: one frozen dataclass per concern, validated on construction.

* ``RunConfig`` — the training run every process agrees on. ``dssgd run`` (or the first
  aggregator) writes it to Redis; workers read it from there, so a scaled-out worker needs nothing
  but the run id and the two URLs.
* ``Connections`` — where RabbitMQ and Redis are (``DSSGD_AMQP_URL``, ``DSSGD_REDIS_URL``).

Values come from, in increasing priority: defaults here, a TOML config file, environment
variables (``DSSGD_<FIELD>``), command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dssgd.shared.errors import ConfigError
from dssgd.shared.partition import parse as partition_scheme
from dssgd.shared.plugins import is_spec
from dssgd.shared.rules import UPDATE_RULES
from dssgd.shared.selection import SELECTION_RULES

ORDERS = ("async", "round-robin", "random")
SELECTIONS = tuple(SELECTION_RULES)  # and any pkg.mod:Name (shared/selection.py)
RULES = ("auto", *UPDATE_RULES)  # and any pkg.mod:Name (shared/rules.py)
VALUE_CODINGS = ("f32", "f16", "q8")
# What float16 can carry: |v| <= 65504 (its largest finite value) and, to keep a value within
# ±γ non-zero, a step 2**-24 (its smallest subnormal) no larger than γ.
F16_MAX, F16_TINY = 65504.0, 2.0**-24
DOWNLOADS = ("most-updated", "random")
BUFFERS = ("whole", "local")
DEFENCES = ("none", "norm", "validation")  # aggregator/defence.py
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")  # used with fullmatch

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class RunConfig:
    run_id: str = "default"
    # The task (shared/tasks.py): a built-in name, FILE.py:NAME or package.module:NAME. Empty =
    # from `model`, the earlier setting: "mlp" or "cnn" are the tasks mnist-mlp and mnist-cnn.
    # After construction `task` is always set and `model` is its short name (mlp, cnn, or the
    # task spec itself), so configurations stored by earlier versions load unchanged.
    task: str = ""
    model: str = ""
    participants: int = 10  # N
    shard_size: int = 600  # images per participant (the paper's 1% of MNIST)
    label_skew: float | None = None  # Dirichlet α for non-IID shards; None = IID
    # Partitioner of simulated data (shared/partition.py): iid, dirichlet:α, classes:k,
    # quantity:β. A label_skew α means dirichlet:α.
    partition: str = "iid"
    # Model buffers (BatchNorm running statistics, counters): "whole" = sent whole in every
    # update and aggregated like parameters; "local" = never leave a participant (FedBN's rule;
    # the aggregator then evaluates with the initial buffers). See docs/TASKS.md.
    buffers: str = "whole"
    theta_u: float = 0.1  # fraction of Δw uploaded per epoch
    theta_d: float = 1.0  # fraction of parameters downloaded per epoch (most-updated first)
    download: str = "most-updated"  # or "random": which θd fraction to download
    selection: str = "topk"  # "topk" (largest |Δw|) or "threshold" (random among |Δw| > τ)
    # lr 0.2, batch 32: fastest to the 0.93 target in asynchronous mode (docs/UPDATE_RULES.md)
    lr: float = 0.2
    batch_size: int = 32
    gamma: float | None = None  # bound on each shared value; None = lr / 4 (scales with the step)
    tau: float | None = None  # selection threshold; None = γ / 10 (the paper's ratio)
    order: str = "async"
    rule: str = "auto"  # "auto" = staleness for async, sum (the paper's) for the ordered modes
    staleness_exponent: float = 1.0  # a in the weight (1 + staleness)^-a
    stat_decay: float = 1.0  # the paper's β: stat := β·stat after every apply (1 = off)
    value_coding: str = "f32"  # wire precision of the shared values: f32, f16, q8
    epochs: int = 30  # local epochs per participant before it stops (0 = no limit)
    seed: int = 1
    data: str = "auto"  # "auto", "hub" or a directory (MNIST's IDX files, or the task's data)
    eval_interval: float = 0.25  # seconds between evaluations, at least (under ~20 % of a core)
    max_staleness: int | None = None  # updates older than this many versions are refused
    max_l2: float | None = None  # server-side L2 bound: a larger update is scaled down to it
    rate_limit: float | None = None  # updates per second one participant may send (burst 1 s)
    # Per-message defence against a lying participant (aggregator/defence.py): none, norm,
    # validation; the margin is the cosine between a step and the validation gradient (uphill)
    # the latter tolerates.
    defence: str = "none"
    defence_margin: float = 0.0
    # Range shards of the parameters in Redis (shared/chunks.py Layout): each a contiguous run of
    # whole chunks under its own hash tag, with its own fenced commit (one Lua script, one
    # cluster slot), version and replay windows; an update too large for one message is split
    # into one message per shard. 1 = every key of a run in one slot, as before.
    shards: int = 1
    queue_max_length: int = 100_000  # backlog bound; beyond it publishes are refused and retried
    # Quorum replicas of the run's queues (x-quorum-initial-group-size); 0 = the broker's
    # default (every cluster node in RabbitMQ 3.x, so 1 on a single node, 3 on a 3-node cluster).
    queue_replicas: int = 0
    # Differential privacy (the paper's sparse vector technique): ε per value (the paper's ε/c);
    # None = no DP. The per-epoch ε of a participant is eps_per_value · θu·n.
    dp_eps_per_value: float | None = None
    dp_budget: float | None = None  # total ε a participant may spend; then it stops publishing
    dp_delta: float = 1e-5  # δ' of the advanced-composition bound that is reported
    # "svt" (the paper's, above) or "dpsgd": record-level DP-SGD in the local epoch (shared.dpsgd)
    dp_mechanism: str = "svt"
    dp_epsilon: float | None = None  # DP-SGD: total ε per participant for the whole run (at δ)
    dp_clip: float = 1.0  # DP-SGD: per-example gradient L2 clip norm C
    dp_noise_multiplier: float | None = None  # DP-SGD σ; None = derived from ε, δ and the run
    # Secure aggregation (docs/SECURE.md): "" = the plaintext aggregator; "two-server" = two
    # non-colluding share servers hold additive shares of every update (shared/secure.py).
    secure: str = ""
    # Both share servers snapshot their state after every K-th stream message (the read API's
    # common points); a ring of this many snapshots bounds how far apart they may drift.
    snapshot_every: int = 4
    snapshot_ring: int = 16
    created: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.run_id, str) or not RUN_ID_RE.fullmatch(self.run_id):
            problems.append(
                f"run id {self.run_id!r} must be 1-48 letters, digits, '-' or '_' (not first)"
            )
        problems += self._normalise_task()
        problems += self._data_problems()
        problems += self._training_problems()
        problems += self._aggregation_problems()
        problems.extend(_coding_problems(self))
        problems += self._run_problems()
        problems += self._svt_problems()
        problems += self._dpsgd_problems()
        problems += self._secure_problems()
        if not 1 <= self.shards <= 4096:
            problems.append(f"shards must be 1..4096, got {self.shards}")
        if not 1 <= self.queue_max_length <= 10_000_000:
            problems.append("queue max length must be 1..10000000")
        if not 0 <= self.queue_replicas <= 9:
            problems.append("queue replicas must be 0 (broker default) .. 9")
        if problems:
            raise ConfigError("; ".join(problems))

    def _data_problems(self) -> list[str]:
        """Participants, shards, thresholds and the exchange modes."""
        out = []
        if not 1 <= self.participants <= 100_000:
            out.append(f"participants must be 1..100000, got {self.participants}")
        if not 1 <= self.shard_size <= 50_000:
            out.append(f"shard size must be 1..50000, got {self.shard_size}")
        if self.label_skew is not None and not self.label_skew > 0:
            out.append("label skew (Dirichlet α) must be > 0")
        for name in ("theta_u", "theta_d"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v <= 1):
                out.append(f"{name} must be in (0, 1], got {v}")
        if self.buffers not in BUFFERS:
            out.append(f"buffers must be one of {', '.join(BUFFERS)}, got {self.buffers!r}")
        if self.download not in DOWNLOADS:
            out.append(f"download must be one of {', '.join(DOWNLOADS)}")
        if self.selection not in SELECTIONS and not is_spec(self.selection):
            out.append(f"selection must be one of {', '.join(SELECTIONS)} or pkg.mod:Name")
        return out

    def _training_problems(self) -> list[str]:
        """The local step: learning rate, batch, γ and τ."""
        out = []
        if not (math.isfinite(self.lr) and self.lr > 0):
            out.append(f"learning rate must be > 0, got {self.lr}")
        if not 1 <= self.batch_size <= 50_000:
            out.append(f"batch size must be >= 1, got {self.batch_size}")
        if self.gamma is not None and not (math.isfinite(self.gamma) and self.gamma > 0):
            out.append(f"gamma must be > 0, got {self.gamma}")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau >= 0):
            out.append(f"tau must be >= 0, got {self.tau}")
        return out

    def _aggregation_problems(self) -> list[str]:
        """How the aggregator orders, weighs and encodes updates."""
        out = []
        if self.order not in ORDERS:
            out.append(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.rule not in RULES and not is_spec(self.rule):
            out.append(f"rule must be one of {', '.join(RULES)} or pkg.mod:Name, got {self.rule!r}")
        if not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            out.append("staleness exponent must be >= 0")
        if not 0 < self.stat_decay <= 1:
            out.append("stat decay β must be in (0, 1]")
        if self.value_coding not in VALUE_CODINGS:
            out.append(f"value coding must be one of {', '.join(VALUE_CODINGS)}")
        return out

    def _run_problems(self) -> list[str]:
        """Run length, evaluation and the aggregator's admission limits."""
        out = []
        if self.epochs < 0:
            out.append("epochs must be >= 0")
        if not (math.isfinite(self.eval_interval) and self.eval_interval > 0):
            out.append("eval interval must be > 0 seconds")
        if self.max_staleness is not None and self.max_staleness < 0:
            out.append("max staleness must be >= 0")
        if self.max_l2 is not None and not (math.isfinite(self.max_l2) and self.max_l2 > 0):
            out.append("max L2 norm must be > 0")
        if self.rate_limit is not None and not (
            math.isfinite(self.rate_limit) and self.rate_limit > 0
        ):
            out.append("rate limit must be > 0 updates per second")
        if self.defence not in DEFENCES:
            out.append(f"defence must be one of {', '.join(DEFENCES)}")
        if not (math.isfinite(self.defence_margin) and -1 <= self.defence_margin <= 1):
            out.append("defence margin must be a cosine in [-1, 1]")
        return out

    def _svt_problems(self) -> list[str]:
        """The paper's sparse-vector DP settings and the reported δ'."""
        out = []
        if self.dp_eps_per_value is not None and not (
            math.isfinite(self.dp_eps_per_value) and self.dp_eps_per_value > 0
        ):
            out.append("DP ε per value must be > 0")
        if self.dp_budget is not None and not (
            math.isfinite(self.dp_budget) and self.dp_budget > 0
        ):
            out.append("DP budget must be > 0")
        if self.dp_budget is not None and self.dp_eps_per_value is None:
            out.append("a DP budget needs --dp-eps-per-value")
        if not 0 < self.dp_delta < 1:
            out.append("DP δ' must be in (0, 1)")
        return out

    def _normalise_task(self) -> list[str]:
        """Fill `task` from the `model` alias (or the reverse); the problems found, if any."""
        aliases = {"mlp": "mnist-mlp", "cnn": "mnist-cnn"}
        task, model = self.task, self.model
        if not isinstance(task, str) or not isinstance(model, str):
            return ["task and model must be strings"]
        if not task.strip():
            if model and model not in aliases:
                return [
                    f"model must be mlp or cnn, got {model!r} "
                    "(any other model: --task FILE.py:NAME)"
                ]
            task = aliases[model or "mlp"]
        task = aliases.get(task.strip(), task.strip())
        short = {v: k for k, v in aliases.items()}.get(task, task)
        object.__setattr__(self, "task", task)
        object.__setattr__(self, "model", short)
        try:
            partition_scheme(self.partition_spec)
        except ConfigError as exc:
            return [str(exc)]
        return []

    @property
    def partition_spec(self) -> str:
        """The partitioner every process uses (a label skew α is dirichlet:α)."""
        if self.label_skew is not None and self.partition == "iid":
            return f"dirichlet:{self.label_skew!r}"
        return self.partition

    def _dpsgd_problems(self) -> list[str]:
        out = []
        if self.dp_mechanism not in ("svt", "dpsgd"):
            out.append(f"DP mechanism must be svt or dpsgd, got {self.dp_mechanism!r}")
        if self.dp_epsilon is not None and not (
            math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0
        ):
            out.append("DP ε must be > 0")
        if not (math.isfinite(self.dp_clip) and self.dp_clip > 0):
            out.append("DP clip norm must be > 0")
        if self.dp_noise_multiplier is not None and not (
            math.isfinite(self.dp_noise_multiplier) and self.dp_noise_multiplier > 0
        ):
            out.append("DP noise multiplier must be > 0")
        if self.dp_mechanism == "dpsgd":
            if self.dp_epsilon is None:
                out.append("--dp-mechanism dpsgd needs --dp-epsilon (total ε per participant)")
            if self.dp_eps_per_value is not None or self.dp_budget is not None:
                out.append("--dp-eps-per-value and --dp-budget belong to --dp-mechanism svt")
            if self.epochs == 0 and self.dp_noise_multiplier is None:
                out.append("DP-SGD derives its noise from the run's length: set --epochs > 0")
        elif self.dp_epsilon is not None or self.dp_noise_multiplier is not None:
            out.append("--dp-epsilon and --dp-noise-multiplier need --dp-mechanism dpsgd")
        return out

    def _secure_problems(self) -> list[str]:
        """What two share servers cannot do: they never see a value (docs/SECURE.md)."""
        if self.secure not in ("", "two-server"):
            return [f"secure must be two-server (or empty), got {self.secure!r}"]
        out = []
        if not (1 <= self.snapshot_every <= 100_000 and 2 <= self.snapshot_ring <= 1000):
            out.append("snapshot every must be 1..100000 and the snapshot ring 2..1000")
        if not self.secure:
            return out
        if self.ordered:
            out.append("--secure two-server runs asynchronously only (--order async)")
        if self.max_l2 is not None:
            out.append("--max-l2 needs the values, which a share server never sees")
        if self.rate_limit is not None:
            out.append("--rate-limit reads the server's clock, so two share servers could "
                       "disagree; not available with --secure")  # fmt: skip
        if self.value_coding != "f32":
            out.append("--secure sends fixed-point shares; --value-coding must stay f32")
        return out

    @property
    def dpsgd(self) -> bool:
        return self.dp_mechanism == "dpsgd" and self.dp_epsilon is not None

    @property
    def dp_on(self) -> bool:
        """Whether participants run a DP mechanism (and so record ε spent)."""
        return self.dp_eps_per_value is not None or self.dpsgd

    # Derived values: one place decides them so every process agrees.
    @property
    def effective_gamma(self) -> float:
        return self.gamma if self.gamma is not None else self.lr / 4

    @property
    def effective_tau(self) -> float:
        return self.tau if self.tau is not None else self.effective_gamma / 10

    @property
    def effective_rule(self) -> str:
        if self.rule != "auto":
            return self.rule
        return "staleness" if self.order == "async" else "sum"

    @property
    def ordered(self) -> bool:
        return self.order != "async"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunConfig:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"stored run configuration is not JSON: {exc}") from exc
        return from_mapping(cls, raw, "stored run configuration")

    def replace(self, **changes: Any) -> RunConfig:
        # `task` and its alias `model` move together: changing one re-derives the other.
        if "model" in changes and "task" not in changes:
            changes["task"] = ""
        elif "task" in changes and "model" not in changes:
            changes["model"] = ""
        return dataclasses.replace(self, **changes)


# The paper's own hyper-parameters (Torch code that descends from the authors'), as a preset.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"lr": 0.001, "batch_size": 1, "gamma": 0.001, "tau": 0.0001},
}


@dataclass(frozen=True)
class Connections:
    amqp_url: str = DEFAULT_AMQP_URL
    redis_url: str = DEFAULT_REDIS_URL

    def __post_init__(self) -> None:
        if not self.amqp_url.startswith(("amqp://", "amqps://")):
            raise ConfigError(
                f"RabbitMQ URL must start with amqp:// or amqps://, got {self.amqp_url!r}"
            )
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"Redis URL must start with redis://, rediss:// or unix://, got {self.redis_url!r}"
            )

    @classmethod
    def from_env(cls, amqp_url: str | None = None, redis_url: str | None = None) -> Connections:
        return cls(
            amqp_url=amqp_url or os.environ.get("DSSGD_AMQP_URL", DEFAULT_AMQP_URL),
            redis_url=redis_url or os.environ.get("DSSGD_REDIS_URL", DEFAULT_REDIS_URL),
        )


def _coerce(tp: Any, value: Any, name: str, where: str) -> Any:
    text = str(tp)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{where}: {name} must not be empty")
    try:
        if "float" in text:
            if isinstance(value, str) and value.lower() in ("", "none") and "None" in text:
                return None
            return float(value)
        if "int" in text:
            if isinstance(value, str) and value.lower() in ("", "none") and "None" in text:
                return None
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
    return str(value)


def from_mapping(cls: Any, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table of settings")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(fields)}"
        )
    values = {k: _coerce(fields[k].type, v, k, where) for k, v in raw.items()}
    return cls(**values)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; settings may sit at top level or under [run]."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from exc
    table = data.get("run", data)
    return {k.replace("-", "_"): v for k, v in table.items() if not isinstance(v, dict)}


def env_overrides(cls: Any, prefix: str = "DSSGD_") -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name.upper()
        if key in os.environ:
            out[f.name] = os.environ[key]
    return out


def _coding_problems(cfg: RunConfig) -> list[str]:
    """A γ the value coding cannot carry is refused here, not by a crashing worker later."""
    if cfg.value_coding != "f16" or not (math.isfinite(cfg.lr) and cfg.lr > 0):
        return []
    gamma = cfg.effective_gamma
    if not math.isfinite(gamma) or gamma <= 0:
        return []
    if gamma >= F16_MAX:
        return [f"f16 carries |values| up to {F16_MAX:.0f}; γ = {gamma:g} needs f32 or q8"]
    if gamma < F16_TINY:
        return [f"f16 rounds every value below {F16_TINY:.3g} to zero; γ = {gamma:g} needs f32"]
    return []
